"""Tensor-parallel process group: who am I, how many of us, and the two collectives we need.

A model is built for one TensorParallel; with size 1 every collective is a no-op, so the single-GPU
and CPU paths run the same code (sharding is a flag, not a second code path).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from polarsparse.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None
    host_group: Any = None  # CPU (gloo) group: control messages and barriers wait on the host, not in GPU kernels

    def split(self, n: int, what: str) -> int:
        """This rank's share of ``n`` units (heads, KV groups, neurons); must divide evenly."""
        if n % self.size:
            raise ConfigError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        return n // self.size

    def padded_split(self, n: int) -> int:
        """Per-rank share of ``n`` rounded up (vocabulary rows; the padding rows are zero)."""
        return -(-n // self.size)

    def host_barrier(self) -> None:
        """Wait, on the CPU only, until every rank gets here (e.g. around CUDA-graph capture)."""
        if self.size > 1:
            dist.barrier(group=self.host_group)

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
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is a stuck rank?
    host = dist.group.WORLD if backend == "gloo" else _host_group()
    return TensorParallel(rank, size, dist.group.WORLD, host)


def _host_group():
    """A gloo group beside NCCL. A rank waiting for a message in an NCCL kernel keeps its GPU busy,
    and an NCCL kernel spinning on one GPU while another rank captures or instantiates a CUDA graph
    can deadlock; on gloo the waiting happens on the CPU. Every rank calls this at the same point."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks are local processes (tcp://127.0.0.1)
    try:
        return dist.new_group(backend="gloo")
    except (RuntimeError, ValueError) as e:  # no gloo: control goes over NCCL as before
        log.warning("no gloo group for tensor-parallel control messages (%s); using NCCL", e)
        return dist.group.WORLD
