"""Paged KV cache: the per-layer tensors and the block allocator that hands out their blocks.

Layout per layer: k, v [num_blocks, Hkv, block_size, D] (one head's block is contiguous, so the
selective-head kernel reads only the chosen heads). Block 0 is reserved as a scratch block: padded
rows of a batch (CUDA-graph buckets) write there and never touch a live sequence.
"""
from __future__ import annotations

import math

import torch

from polarsparse.config import ConfigError, EngineConfig, ModelConfig

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """No free KV block; the scheduler preempts instead of failing."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ConfigError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._is_free = bytearray(num_blocks)  # 1: on the free list (the NULL block never is)
        for b in self._free:
            self._is_free[b] = 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._is_free[b] = 0
        return out

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool. Freeing a block twice (or the NULL block, or one that does not
        exist) is a bookkeeping bug that would hand one block to two sequences: it raises, and
        nothing is freed."""
        bad = [b for b in blocks if not (NULL_BLOCK < b < self.num_blocks) or self._is_free[b]]
        if bad or len(set(blocks)) != len(blocks):
            raise RuntimeError(f"KV blocks freed twice or never allocated: {sorted(set(bad)) or blocks}")
        for b in blocks:
            self._is_free[b] = 1
        self._free.extend(reversed(blocks))

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_usable


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """KV bytes of one block over all layers; num_kv_heads: this rank's (default: all)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * (num_kv_heads or cfg.num_kv_heads) * block_size * cfg.head_dim * elem


def plan_num_blocks(cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, device: torch.device,
                    num_kv_heads: int | None = None) -> int:
    """How many blocks fit the memory budget (explicit count wins); num_kv_heads: this rank's."""
    if ecfg.num_kv_blocks is not None:
        return ecfg.num_kv_blocks
    per_block = bytes_per_block(cfg, ecfg.block_size, dtype, num_kv_heads)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * ecfg.kv_cache_memory
    else:
        budget = ecfg.kv_cache_memory * 2**30
    max_len = ecfg.max_model_len or cfg.max_model_len
    # never allocate far more than max_num_seqs full-length sequences need
    cap = ecfg.max_num_seqs * math.ceil(max_len / ecfg.block_size) + 1
    return max(2, min(int(budget // per_block), cap))


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 num_kv_heads: int | None = None):
        """num_kv_heads: the KV heads this rank holds (tensor parallelism; default: all)."""
        shape = (num_blocks, num_kv_heads or cfg.num_kv_heads, block_size, cfg.head_dim)
        self.block_size = block_size
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)
