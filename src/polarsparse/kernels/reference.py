"""Pure-PyTorch semantics of every polarsparse kernel: the ground truth.

These functions define what the Triton kernels in ``attention.py``, ``mlp.py`` and
``select.py`` must compute.
They run on any device, accumulate in fp32 and return the input dtype. None of them synchronises
with the host, so they can also be captured in a CUDA graph (they are slow, not unsafe).

Layouts (shared with the Triton kernels):

* KV cache (paged): ``k_cache, v_cache: [num_blocks, Hkv, block_size, D]``; head-major inside a
  block so one head's block is one contiguous ``[block_size, D]`` tile.
  ``block_tables: int32 [B, max_blocks_per_seq]``; ``context_lens: int32 [B]``.
  Token ``t`` of sequence ``b`` lives at ``k_cache[block_tables[b, t // bs], :, t % bs, :]``.
* MLP: fc1 weight ``w: [I, d]`` (ReLU) or the fused gate/up weight ``[2I, d]`` (rows ``0..I-1``
  gate, ``I..2I-1`` up); fc2/down weight stored transposed, ``w2t: [I, d]``, so one neuron's
  weights are one contiguous row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "silu_gated")


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --------------------------------------------------------------------------- attention
def _gather_paged(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [NB, Hkv, bs, D], block_tables [B, MB] -> contiguous [B, Hkv, MB*bs, D]."""
    num_blocks, hkv, bs, d = cache.shape
    bt = block_tables.long().clamp(0, num_blocks - 1)  # entries past a sequence may be anything
    pages = cache[bt]  # [B, MB, Hkv, bs, D]
    b, mb = bt.shape
    return pages.permute(0, 2, 1, 3, 4).reshape(b, hkv, mb * bs, d)


def chosen_group_mask(head_idx: torch.Tensor | None, batch: int, num_kv_heads: int,
                      device: torch.device) -> torch.Tensor:
    """head_idx [B, k] (or None) -> bool [B, Hkv], True where a KV group is computed."""
    if head_idx is None:
        return torch.ones(batch, num_kv_heads, dtype=torch.bool, device=device)
    mask = torch.zeros(batch, num_kv_heads, dtype=torch.bool, device=device)
    return mask.scatter(1, head_idx.long(), True)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store token n's k[n], v[n] ([Hkv, D], converted to the cache dtype) at slot
    ``slot_mapping[n]``: block ``slot // bs``, offset ``slot % bs`` (in place)."""
    bs = k_cache.shape[2]
    blk, off = slot_mapping // bs, slot_mapping % bs
    k_cache[blk, :, off] = k.to(k_cache.dtype)
    v_cache[blk, :, off] = v.to(v_cache.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           head_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one new token per sequence over a paged KV cache.

    q: [B, Hq, D] with Hq = G * Hkv. head_idx: None (all heads) or [B, k] KV-group indices;
    every query head of a chosen group is computed, the others are exactly 0.
    Returns [B, Hq, D] in q.dtype (fp32 accumulation).
    """
    batch, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    k = _acc(_gather_paged(k_cache, block_tables))  # [B, Hkv, T, D]
    v = _acc(_gather_paged(v_cache, block_tables))
    t = k.shape[2]
    valid = torch.arange(t, device=q.device)[None, :] < context_lens.long()[:, None]  # [B, T]
    valid4 = valid[:, None, :, None]
    # Cache slots past the context may hold garbage (even NaN): never let them reach the sum.
    k = torch.where(valid4, k, 0.0)
    v = torch.where(valid4, v, 0.0)
    qg = _acc(q).view(batch, hkv, group, d)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale  # [B, Hkv, G, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, v)  # [B, Hkv, G, D]
    chosen = chosen_group_mask(head_idx, batch, hkv, q.device)[:, :, None, None]
    out = torch.where(chosen, out, 0.0)
    return out.reshape(batch, hq, d).to(q.dtype)


def head_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, Hkv] -> int64 [B, k]: per-row top-k group indices, sorted ascending.

    Selection semantics (shared with ``mlp_union_topk`` and the Triton kernels in
    ``select.py``): the k largest values, where NaN ranks above +inf and -0.0 equals +0.0, and
    ties are broken by the lower index, so the result is unique and always exactly k indices.
    """
    return topk_rows(scores, k)


# --------------------------------------------------------------------------- MLP
def _split_gated(w: torch.Tensor) -> tuple[int, int]:
    """Fused gate/up weight [2I, d] -> (I, d)."""
    two_i, d = w.shape
    if two_i % 2:
        raise ValueError(f"silu_gated expects a fused [2I, d] weight, got {tuple(w.shape)}")
    return two_i // 2, d


def _rows(t: torch.Tensor | None, idx: torch.Tensor | None, offset: int = 0,
          count: int | None = None) -> torch.Tensor | None:
    """Rows ``offset + idx`` of t (or rows offset..offset+count when idx is None)."""
    if t is None:
        return None
    if idx is None:
        return t[offset:offset + count] if count is not None else t
    return t.index_select(0, idx.long() + offset)


def gather_fc1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               idx: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Selective fc1 with the activation fused.

    x: [B, d]. relu: w [I, d], b [I] | None -> h [B, k] = relu(x @ w[idx].T + b[idx]).
    silu_gated: w [2I, d] (gate rows then up rows), b [2I] | None ->
    h = silu(x @ w[idx].T + b[idx]) * (x @ w[I + idx].T + b[I + idx]).
    idx: [k] sorted unique neuron indices, or None for all I neurons.
    """
    xf = _acc(x)
    if activation == "relu":
        h = F.linear(xf, _acc(_rows(w, idx)), None if b is None else _acc(_rows(b, idx)))
        return torch.relu(h).to(x.dtype)
    if activation == "silu_gated":
        inter, _ = _split_gated(w)
        gate = F.linear(xf, _acc(_rows(w, idx, 0, inter)),
                        None if b is None else _acc(_rows(b, idx, 0, inter)))
        up = F.linear(xf, _acc(_rows(w, idx, inter, inter)),
                      None if b is None else _acc(_rows(b, idx, inter, inter)))
        return (F.silu(gate) * up).to(x.dtype)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def gather_fc2(h: torch.Tensor, w2t: torch.Tensor, b2: torch.Tensor | None,
               idx: torch.Tensor | None) -> torch.Tensor:
    """Selective fc2: h [B, k], w2t [I, d], b2 [d] | None -> y [B, d] = h @ w2t[idx] + b2."""
    y = _acc(h) @ _acc(_rows(w2t, idx))
    if b2 is not None:
        y = y + _acc(b2)
    return y.to(h.dtype)


def mlp_union_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, I] router logits -> int64 [k]: top-k of the per-neuron max over the batch,
    sorted ascending (the batch union of active neurons). Ties and NaN as in ``head_topk``."""
    return topk_rows(scores.amax(dim=0).view(1, -1), k).view(k)


# --------------------------------------------------------------------------- top-k selection
_SORT_MAX_N = 256  # rows up to this long (and fp64 rows) use the stable sort itself


def order_keys(v: torch.Tensor) -> torch.Tensor:
    """fp32/fp16/bf16 -> int32 keys with the same order; -0.0 and +0.0 share a key and every
    NaN gets the largest key (the keys of ``select.py``, before its exact per-dtype shift)."""
    bits = v.float().view(torch.int32)
    mag = bits & 0x7FFFFFFF
    key = torch.where(bits < 0, -mag, mag)  # sign-magnitude -> two's complement
    return key.masked_fill_(mag > 0x7F800000, 0x7FFFFFFF)


def check_k(k: int, n: int) -> None:
    """A top-k of n values needs 0 <= k <= n (the reference and the Triton kernels alike)."""
    if not 0 <= k <= n:
        raise ValueError(f"top-k of {n} values needs 0 <= k <= {n}, got k={k}")


def topk_rows(v: torch.Tensor, k: int) -> torch.Tensor:
    """v [R, N] floats -> int64 [R, k]: per row, the indices of the k largest values (NaN
    largest, -0.0 == +0.0, ties -> lower index), sorted ascending. No host synchronisation on
    accelerators.

    Definition: the first k of a stable descending sort. Long rows get the same answer faster
    from a rank that is unique per row (the value's order key in the high 32 bits, the reversed
    index in the low 32): an unsorted ``topk`` of the ranks, then the indices in ascending order.
    """
    rows, n = v.shape
    check_k(k, n)
    if n <= _SORT_MAX_N or k == 0 or v.dtype == torch.float64:
        # integer keys: a float sort places NaN differently by device and dtype (CUDA bf16)
        keys = v if v.dtype == torch.float64 else order_keys(v)
        order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
        return order.sort(dim=1).values
    rank = order_keys(v).long() * 2**32 + torch.arange(n - 1, -1, -1, device=v.device)
    top = torch.topk(rank, k, dim=1, sorted=False)
    if v.device.type == "cpu":  # O(N) compaction, in order; nonzero would sync an accelerator
        return (rank >= top.values.amin(dim=1, keepdim=True)).nonzero()[:, 1].view(rows, k)
    return top.indices.sort(dim=1).values
