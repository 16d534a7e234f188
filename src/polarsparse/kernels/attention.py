"""Selective-head paged decode attention in Triton (split-K / flash-decoding).

Semantics: ``reference.paged_decode_attention``. One program owns one chosen
(sequence, KV group) pair and one contiguous split of that sequence's tokens; it computes all G
query heads of the group at once (``tl.dot`` with M = G padded to 16), so a KV tile is read once
per group. Unchosen groups launch no program: their KV is never read. With more than one
split, each program writes a normalised partial output and its log-sum-exp.

CUDA-graph safe: the grid and the scratch buffers depend only on tensor shapes (the split count
comes from ``block_tables.shape[1]``, never from ``context_lens`` values), no host sync.
One launch per call: besides the pair programs, one program per sequence writes the exact
zeros of its unchosen heads (sparse mode), and with several splits the last split of a pair to
finish (an atomic counter per pair, reset by that program) merges the partials.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import cdiv, dot_precision, interpreting, next_pow2, num_sms, split_counters

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # more splits only add merge work: 64 already fills an H100 at B*k = 8
MIN_M = 16  # smallest M of a tensor-core dot on the GPU


@dataclass(frozen=True)
class AttnConfig:
    block_n: int  # tokens per inner iteration
    num_warps: int
    num_stages: int
    min_split_tokens: int  # a split reads at least this many tokens
    programs_per_sm: int  # programs resident per SM (occupancy: registers and shared memory)


def attention_config(head_dim: int, group: int, device: torch.device) -> AttnConfig:
    """Built-in heuristic block config (no tuning needed on a fresh install)."""
    if device.type != "cuda":  # interpreter: big tiles, few programs
        return AttnConfig(block_n=64, num_warps=4, num_stages=1, min_split_tokens=64,
                          programs_per_sm=1)
    if head_dim >= 128:  # 125 registers/thread, 3 x 32 KB K+V stages: 4 programs per SM
        return AttnConfig(block_n=64, num_warps=4, num_stages=3, min_split_tokens=256,
                          programs_per_sm=4)
    return AttnConfig(block_n=128, num_warps=4, num_stages=3, min_split_tokens=256,
                      programs_per_sm=4)


def _split_len(max_ctx: int, splits: int, block_n: int) -> int:
    return cdiv(cdiv(max_ctx, splits), block_n) * block_n


def _wave_aligned_splits(work: int, max_ctx: int, cfg: AttnConfig, sms: int) -> int:
    """Split count with the least (waves of resident programs) x (tokens per program).

    A grid of 1.2 waves runs almost as long as 2 full waves, so the split count is chosen for
    whole waves rather than a bare program count; ties go to fewer splits (less merge work).
    """
    slots = cfg.programs_per_sm * sms
    max_splits = max(1, min(MAX_SPLITS, cdiv(max_ctx, cfg.min_split_tokens)))
    best, best_cost = 1, float("inf")
    for splits in range(1, max_splits + 1):
        split_len = _split_len(max_ctx, splits, cfg.block_n)
        actual = cdiv(max_ctx, split_len)
        cost = cdiv(work * actual, slots) * split_len
        if cost < 0.97 * best_cost:
            best, best_cost = actual, cost
    return best


def plan_splits(work: int, max_ctx: int, cfg: AttnConfig, sms: int,
                num_splits: int | None = None) -> tuple[int, int]:
    """-> (num_splits, split_len) for ``work`` (sequence, group) pairs of up to ``max_ctx``
    tokens: splits are multiples of block_n tokens, at least min_split_tokens long, and fill
    whole waves of the device. Depends on shapes only (CUDA-graph safe)."""
    if num_splits is None:
        num_splits = _wave_aligned_splits(work, max_ctx, cfg, sms)
    num_splits = max(1, min(num_splits, MAX_SPLITS, cdiv(max_ctx, cfg.block_n)))
    split_len = _split_len(max_ctx, num_splits, cfg.block_n)
    return cdiv(max_ctx, split_len), split_len


@triton.jit
def _attend_split(
    q_ptr, k_ptr, v_ptr, bt_ptr, b, g, start, stop, scale_log2,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_btb,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online softmax of group g's G query heads over tokens [start, stop) of sequence b.
    -> (acc [G_PAD, D] unnormalised, m [G_PAD] running max (log2 domain), l [G_PAD] sum)."""
    rows = tl.arange(0, G_PAD)
    dofs = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (g * G + rows)[:, None] * stride_qh + dofs[None, :],
                mask=(rows < G)[:, None], other=0.0)  # [G_PAD, D]
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    toks = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + b * stride_btb
    for t0 in range(start, stop, BLOCK_N):
        t = t0 + toks
        tmask = t < stop
        page = tl.load(bt_row + t // PAGE, mask=tmask, other=0).to(tl.int64)
        slot = t % PAGE
        k_off = page * stride_kb + g * stride_kh + slot * stride_kt
        k = tl.load(k_ptr + k_off[:, None] + dofs[None, :], mask=tmask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [G_PAD, BLOCK_N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = page * stride_vb + g * stride_vh + slot * stride_vt
        v = tl.load(v_ptr + v_off[:, None] + dofs[None, :], mask=tmask[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _merge_splits(opart_ptr, lpart_ptr, pair, num_splits,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    """Combine the normalised partial outputs of all splits of one pair -> [G_PAD, D]."""
    rows = tl.arange(0, G_PAD)
    dofs = tl.arange(0, D)
    rmask = rows < G
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(lpart_ptr + (pair * num_splits + s) * G + rows, mask=rmask, other=0.0,
                      cache_modifier=".cg")
        m = tl.maximum(m, lse)
    acc = tl.zeros([G_PAD, D], tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    for s in range(0, num_splits):
        base = (pair * num_splits + s) * G + rows
        w = tl.exp2(tl.load(lpart_ptr + base, mask=rmask, other=0.0, cache_modifier=".cg") - m)
        o = tl.load(opart_ptr + base[:, None] * D + dofs[None, :], mask=rmask[:, None],
                    other=0.0, cache_modifier=".cg")
        acc += w[:, None] * o
        den += w
    return acc / den[:, None]


@triton.jit
def _zero_unchosen(hidx_ptr, out_ptr, b, k_sel, stride_hb, stride_ob, stride_oh,
                   HQ: tl.constexpr, HQ_PAD: tl.constexpr, K_PAD: tl.constexpr,
                   G: tl.constexpr, D: tl.constexpr):
    """Write exact zeros to the query heads of every KV group sequence b did not choose."""
    heads = tl.arange(0, HQ_PAD)
    kofs = tl.arange(0, K_PAD)
    sel = tl.load(hidx_ptr + b * stride_hb + kofs, mask=kofs < k_sel, other=-1).to(tl.int32)
    hits = tl.sum((sel[None, :] == (heads // G)[:, None]).to(tl.int32), axis=1)  # [HQ_PAD]
    write = (heads < HQ) & (hits == 0)
    dofs = tl.arange(0, D)
    zero = tl.zeros([HQ_PAD, D], out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dofs[None, :], zero,
             mask=write[:, None])


@triton.jit
def _attn_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, hidx_ptr, out_ptr, opart_ptr, lpart_ptr, cnt_ptr,
    scale_log2, num_pairs, k_sel, split_len, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_btb, stride_hb, stride_ob, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, HQ: tl.constexpr, HQ_PAD: tl.constexpr,
    K_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, ONE_SPLIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (num_pairs [+ B zeroing programs when sparse], num_splits)."""
    pair = tl.program_id(0)  # chosen (sequence, group) pair: b * k_sel + j
    sid = tl.program_id(1)  # split of the sequence's tokens
    b = pair // k_sel
    if pair >= num_pairs:  # one zeroing program per sequence (sparse mode only)
        if sid == 0:
            _zero_unchosen(hidx_ptr, out_ptr, pair - num_pairs, k_sel, stride_hb, stride_ob,
                           stride_oh, HQ, HQ_PAD, K_PAD, G, D)
    else:
        if DENSE:
            g = pair % k_sel
        else:
            g = tl.load(hidx_ptr + b * stride_hb + pair % k_sel).to(tl.int32)
        ctx = tl.load(ctx_ptr + b)
        start = sid * split_len
        stop = tl.minimum(start + split_len, ctx)
        acc, m_i, l_i = _attend_split(
            q_ptr, k_ptr, v_ptr, bt_ptr, b, g, start, stop, scale_log2,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
            stride_vt, stride_btb, G, G_PAD, D, PAGE, BLOCK_N, UPCAST, DOT_PREC)
        rows = tl.arange(0, G_PAD)
        dofs = tl.arange(0, D)
        rmask = rows < G
        has = l_i > 0.0  # False only for an empty split (start >= ctx)
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + b * stride_ob + (g * G + rows)[:, None] * stride_oh + dofs[None, :]
        if ONE_SPLIT:
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        else:
            # Publish this split, then the last split to arrive merges all of them.
            base = (pair * num_splits + sid) * G + rows  # row of scratch [pairs, splits, G]
            tl.store(opart_ptr + base[:, None] * D + dofs[None, :], o, mask=rmask[:, None])
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(lpart_ptr + base, lse, mask=rmask)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pair, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                res = _merge_splits(opart_ptr, lpart_ptr, pair, num_splits, G, G_PAD, D)
                tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
                tl.store(cnt_ptr + pair, 0)  # ready for the next launch


def _check_layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous in the head dimension")
    if q.shape[-1] not in (64, 128) and not interpreting():
        raise ValueError(f"head dim {q.shape[-1]} not supported (64 or 128)")
    if k_cache.shape[2] & (k_cache.shape[2] - 1):
        raise ValueError(f"block_size {k_cache.shape[2]} must be a power of two")


def triton_paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, head_idx: torch.Tensor | None = None, *,
    num_splits: int | None = None, config: AttnConfig | None = None,
) -> torch.Tensor:
    """Triton version of ``reference.paged_decode_attention`` (same arguments and result).

    q: [B, Hq, D]; k_cache/v_cache: [NB, Hkv, bs, D]; block_tables: int32 [B, MB];
    context_lens: int32 [B]; head_idx: None or [B, k]. Returns [B, Hq, D] in q.dtype.
    ``num_splits``/``config`` override the built-in heuristics (benchmarks and tests only).
    """
    _check_layout(q, k_cache, v_cache)
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    batch, hq, d = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    dense = head_idx is None
    k_sel = hkv if dense else head_idx.shape[1]
    hidx = q if dense else head_idx.contiguous()  # dummy pointer when dense
    pairs = batch * k_sel
    cfg = config or attention_config(d, group, q.device)
    splits, split_len = plan_splits(pairs, block_tables.shape[1] * page, cfg, num_sms(q.device),
                                    num_splits)
    out = torch.empty_like(q)  # every element is written: chosen heads or exact zeros
    one = splits == 1
    opart = out if one else torch.empty(pairs, splits, group, d, device=q.device,
                                        dtype=torch.float32)
    lpart = out if one else torch.empty(pairs, splits, group, device=q.device,
                                        dtype=torch.float32)
    counters = out if one else split_counters(q.device, pairs)
    zeroing = 0 if dense else batch  # one program per sequence writes the unchosen heads' zeros
    _attn_decode_kernel[(pairs + zeroing, splits)](
        q, k_cache, v_cache, block_tables, context_lens, hidx, out, opart, lpart, counters,
        scale * LOG2E, pairs, k_sel, split_len, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), 0 if dense else hidx.stride(0), out.stride(0), out.stride(1),
        G=group, G_PAD=max(MIN_M, next_pow2(group)), HQ=hq, HQ_PAD=next_pow2(hq),
        K_PAD=next_pow2(k_sel), D=d, PAGE=page, BLOCK_N=cfg.block_n, DENSE=dense,
        ONE_SPLIT=one, UPCAST=interpreting(), DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


__all__ = ["triton_paged_decode_attention", "attention_config", "plan_splits", "AttnConfig"]
