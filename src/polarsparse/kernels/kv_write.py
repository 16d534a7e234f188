"""Paged KV-cache write in Triton: one launch stores the new K and V of every token.

Semantics: ``reference.write_kv``. In torch the same write is four or more kernels per layer (slot
// block_size, slot % block_size, two index_put); in a decode step of a small batch each one costs
a launch gap worth more than its bytes. Here program n copies token n's K and V rows
([Hkv, D] each, converted to the cache dtype) into block ``slot // bs``, offset ``slot % bs``.
CUDA-graph safe: the grid depends only on the number of tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kn, stride_kh, stride_vn, stride_vh,
                     stride_cb, stride_ch, stride_cs,
                     BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_HD: tl.constexpr):
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    offs = tl.arange(0, BLOCK_HD)
    h, d = offs // HEAD_DIM, offs % HEAD_DIM
    mask = offs < HEADS * HEAD_DIM
    dst = blk * stride_cb + h * stride_ch + off * stride_cs + d
    k = tl.load(k_ptr + n * stride_kn + h * stride_kh + d, mask=mask)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + n * stride_vn + h * stride_vh + d, mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """k_cache, v_cache [NB, Hkv, bs, D] (last dim contiguous); k, v [N, Hkv, D] (views of the
    fused qkv output are fine: only the last dim must be contiguous); slot_mapping [N]."""
    n, heads, dim = k.shape
    if n == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("write_kv needs a contiguous last dim and K/V caches of one layout")
    _write_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[2], HEADS=heads, HEAD_DIM=dim, BLOCK_HD=next_pow2(heads * dim),
        num_warps=4 if heads * dim <= 2048 else 8,
    )
