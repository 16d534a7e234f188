"""Tensor-parallel process group: who am I, how many of us, and the two collectives we need.

A model is built for one TensorParallel; with size 1 every collective is a no-op, so the single-GPU
and CPU paths run the same code (sharding is a flag, not a second code path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from polarsparse.config import ConfigError


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None

    def split(self, n: int, what: str) -> int:
        """This rank's share of ``n`` units (heads, KV groups, neurons); must divide evenly."""
        if n % self.size:
            raise ConfigError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        return n // self.size

    def padded_split(self, n: int) -> int:
        """Per-rank share of ``n`` rounded up (vocabulary rows; the padding rows are zero)."""
        return -(-n // self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n] (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r uses cuda:r on GPUs; every rank uses the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device) -> TensorParallel:
    """Join the default process group (NCCL for CUDA, gloo for CPU) and return this rank's view."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if dist.is_initialized():
        raise ConfigError("a tensor-parallel engine is already running in this process; close() it first")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    return TensorParallel(rank, size, dist.group.WORLD)
