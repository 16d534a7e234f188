"""The CPU fast path of paged decode attention: the reference's semantics in one SDPA call.

reference.py spells the computation out op by op (the ground truth); on CPU that costs a dozen small
kernels per layer, which dominate a decode step of a small model. This version gathers each
sequence's blocks once and lets SDPA do the masked softmax. It relies on what the engine guarantees
(cache slots past a context hold finite values: the cache is zero-initialised and only ever holds
written K/V); tests compare it with the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _gather_paged, chosen_group_mask


def sdpa_paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                head_idx: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D], paged k/v [NB, Hkv, bs, D], head_idx None | [B, k] -> [B, Hq, D]."""
    batch, hq, _ = q.shape
    hkv = k_cache.shape[1]
    k = _gather_paged(k_cache, block_tables).to(q.dtype)  # [B, Hkv, T, D]
    v = _gather_paged(v_cache, block_tables).to(q.dtype)
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens.long()[:, None]  # [B, T]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=hq != hkv).squeeze(2)  # [B, Hq, D]
    if head_idx is not None:
        chosen = chosen_group_mask(head_idx, batch, hkv, q.device).repeat_interleave(hq // hkv, dim=1)
        out = out * chosen[:, :, None].to(out.dtype)
    return out
