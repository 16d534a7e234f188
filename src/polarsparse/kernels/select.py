"""Exact top-k selection in Triton: the batch union of MLP neurons and per-row head groups.

Semantics: ``reference.mlp_union_topk`` / ``reference.head_topk`` (the k largest values, NaN
above +inf, -0.0 == +0.0, ties broken by the lower index, indices returned sorted ascending).

Design (one row = one program; nothing is sorted):

* Every value becomes an order-preserving int32 key (sign-magnitude float bits to two's
  complement; -0.0 gets +0.0's key, every NaN the largest key). Keys of bf16 / fp16 inputs are
  shifted right by 16 / 13 bits, exact for values of that type, leaving 16 / 19 significant bits.
* The k-th largest key ``t`` is built by bisection over the key bits, most significant first:
  one pass counts ``key >= 0`` (the sign), then each pass tries ``t + 2^b`` and keeps it when at
  least k keys reach it. A pass is one ``tl.sum`` over keys held in registers: 16 passes for
  bf16, 19 for fp16, 32 for fp32.
* The result is every key ``> t`` plus the first ``k - count(key > t)`` keys ``== t`` in index
  order: exactly k indices. Selected index ``i`` goes to ``cumsum(gt)[i] + min(cumsum(eq)[i],
  need) - 1`` (one packed scan), which writes them compacted and ascending.

``union_topk`` first reduces the batch. Up to ``FUSED_BATCH`` rows are max-reduced inside the
selection program (unrolled, so all row loads are in flight together; B=1 costs nothing extra).
Larger batches take a bandwidth-bound max kernel over many programs (each owns a 64-column slab
and walks down the batch in [64, 64] tiles) into an [I] scratch of the input dtype (exact: the
max is one of the inputs), then the single selection program. NaN propagates through the batch
max, as in ``torch.amax``.

Limits and cost: a selection program holds ``next_pow2(N)`` keys in registers (16 warps: 32 keys
a thread at N = 16384, where ptxas for sm_90 reports 116-128 registers and no spills for bf16 /
fp16, 60 bytes for fp32; at 32768 it spills kilobytes a thread). Rows longer than
``MAX_TRITON_N`` (16384), and dtypes other than fp32/fp16/bf16, take the torch reference. The
selection runs on one SM, so its cost is set by its per-element ALU work (~3 instructions per
key and pass, plus the final scan and stores), not by memory. Everything is CUDA-graph safe: no
host synchronisation, grids and buffers depend only on shapes, and the only allocations are the
output and (B > FUSED_BATCH) the [I] scratch, ordinary caching-allocator tensors (graph-pool
memory when captured).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._launch import cdiv, next_pow2, num_sms

MAX_TRITON_N = 16384  # longest row one selection program holds in registers (sm_90: no spills;
# 32768 compiles but spills kilobytes a thread, so longer rows keep the torch path)
FUSED_BATCH = 4  # union_topk: batches up to this are max-reduced inside the selection program

# Right shift of the fp32 key that is exact for values of the input dtype (bf16: 16 low
# mantissa bits are zero; fp16: 13), so the bisection runs over 32 - shift bits.
_KEY_SHIFT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _float_key(x, SHIFT: tl.constexpr):
    """fp32 [..] -> int32 keys ordered like the floats; -0.0 -> key(+0.0), NaN -> largest key."""
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -mag, mag)  # sign-magnitude -> two's complement; -0.0 -> 0
    key = tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)  # any NaN -> the largest key
    return key >> SHIFT


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _batch_max_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_row,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = max_r x[r, c] (NaN propagates), stored in x's dtype (exact: it is one of the
    inputs); one program per BLOCK_C columns, looping down the batch in [BLOCK_R, BLOCK_C] tiles."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    acc = tl.full([BLOCK_C], float("-inf"), tl.float32)
    n_nan = tl.zeros([BLOCK_C], tl.int32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < n_rows)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], mask=m,
                    other=float("-inf")).to(tl.float32)
        # tl.max skips NaN on the GPU, so NaNs are counted apart (integer test, no fast-math risk)
        is_nan = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) > 0x7F800000
        n_nan += tl.sum(is_nan.to(tl.int32), axis=0)
        acc = tl.maximum(acc, tl.max(tl.where(is_nan, float("-inf"), x), axis=0))
    acc = tl.where(n_nan > 0, float("nan"), acc)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _select_kernel(x_ptr, out_ptr, n, k, stride_row, stride_red,
                   N_RED: tl.constexpr, BLOCK: tl.constexpr, SHIFT: tl.constexpr,
                   MIN_KEY: tl.constexpr, PASSES: tl.constexpr, STEP0: tl.constexpr):
    """Program r: the k largest of max_j x[r, j, :n] (j < N_RED) -> out[r, :k] ascending.

    x row r, reduction row j, column c lives at x_ptr + r*stride_row + j*stride_red + c.
    Keys lie in [MIN_KEY, -MIN_KEY); masked lanes get MIN_KEY, below every real key.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    base = x_ptr + row * stride_row
    x = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
    for j in tl.static_range(1, N_RED):  # unrolled: the row loads are all in flight at once
        y = tl.load(base + j * stride_red + offs, mask=valid, other=0.0).to(tl.float32)
        x = _nan_max(x, y)
    key = tl.where(valid, _float_key(x, SHIFT), MIN_KEY)

    # t = the k-th largest key: the largest t with count(key >= t) >= k, built bit by bit.
    n_nonneg = tl.sum((key >= 0).to(tl.int32), axis=0)
    t = tl.where(n_nonneg >= k, 0, MIN_KEY)
    step = tl.full([], STEP0, tl.int32)
    for _ in range(PASSES):  # cand stays inside t's bucket [t, t + 2*step): no overflow
        cand = t + step
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        t = tl.where(cnt >= k, cand, t)
        step = step >> 1

    gt = key > t
    eq = key == t
    need = k - tl.sum(gt.to(tl.int32), axis=0)  # >= 1: how many ties at t are taken
    # One scan for both running counts: gt in the low 16 bits, eq in the high 16 (a count is at
    # most n <= 2^15 < 2^16; the eq field may reach bit 31, hence the masks).
    c_both = tl.cumsum(gt.to(tl.int32) | (eq.to(tl.int32) << 16), axis=0)
    c_gt = c_both & 0xFFFF
    c_eq = (c_both >> 16) & 0xFFFF
    sel = gt | (eq & (c_eq <= need))
    pos = c_gt + tl.minimum(c_eq, need) - 1
    out_row = out_ptr + row * k
    tl.store(out_row + pos, offs.to(tl.int64), mask=sel & valid)


# --------------------------------------------------------------------------- host side
def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def _launch_select(x: torch.Tensor, out: torch.Tensor, rows: int, n: int, k: int, n_red: int,
                   stride_row: int, stride_red: int) -> None:
    shift = _KEY_SHIFT[x.dtype]
    block = max(16, next_pow2(n))
    bits = 32 - shift  # keys lie in [-2^(bits-1), 2^(bits-1))
    _select_kernel[(rows,)](
        x, out, n, k, stride_row, stride_red,
        N_RED=n_red, BLOCK=block, SHIFT=shift, MIN_KEY=-(1 << (bits - 1)), PASSES=bits - 1,
        STEP0=1 << (bits - 2), num_warps=_num_warps(block))


def _supported(scores: torch.Tensor) -> bool:
    return scores.dtype in _KEY_SHIFT and scores.shape[-1] <= MAX_TRITON_N


def union_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, I] -> int64 [k]: the k largest of ``scores.amax(0)``, sorted ascending."""
    batch, n = scores.shape
    reference.check_k(k, n)
    if not _supported(scores) or batch == 0:
        return reference.mlp_union_topk(scores, k)
    out = torch.empty(k, dtype=torch.int64, device=scores.device)
    if k == 0:
        return out
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    if batch <= FUSED_BATCH:
        _launch_select(scores, out, 1, n, k, batch, 0, scores.stride(0))
        return out
    amax = torch.empty(n, dtype=scores.dtype, device=scores.device)
    # ~2 column slabs per SM; each program loads [BLOCK_R, BLOCK_C] tiles down the batch.
    block_c = max(32, min(512, next_pow2(cdiv(n, 2 * num_sms(scores.device)))))
    block_r = max(1, min(next_pow2(batch), 4096 // block_c))
    _batch_max_kernel[(cdiv(n, block_c),)](scores, amax, batch, n, scores.stride(0),
                                           BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    _launch_select(amax, out, 1, n, k, 1, 0, 0)
    return out


def head_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, U] -> int64 [B, k]: per-row k largest, sorted ascending; one program a row."""
    rows, n = scores.shape
    reference.check_k(k, n)
    if not _supported(scores):
        return reference.head_topk(scores, k)
    out = torch.empty(rows, k, dtype=torch.int64, device=scores.device)
    if k == 0 or rows == 0:
        return out
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    _launch_select(scores, out, rows, n, k, 1, scores.stride(0), 0)
    return out
