"""Layers shared by every model family: norms, rotary embedding, paged attention, MLPs.

Weights are stored the way the fast path reads them: fused qkv, fused gate/up ([2I, d], gate rows
first) and the second MLP matrix transposed ([I, d]) so a neuron's weights are one contiguous row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polarsparse import kernels
from polarsparse.config import ModelConfig
from polarsparse.distributed.linear import RowParallelLinear
from polarsparse.distributed.state import SINGLE, TensorParallel
from polarsparse.models.batch import ForwardBatch, LayerPlan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[D/2] inverse frequencies, with 'linear' or 'llama3' (LLaMA-3.1) scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    return _llama3_inv_freq(inv_freq, factor, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, s: dict) -> torch.Tensor:
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table of shape [max_len, D]."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions: [N]; q: [N, Hq, D]; k: [N, Hkv, D]."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [N, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention over a paged KV cache
# ----------------------------------------------------------------------------------------------
class PagedAttention(nn.Module):
    """Self-attention with fused qkv, writing new K/V into a paged cache.

    Under tensor parallelism each rank owns Hq / tp and Hkv / tp heads (qkv is column-parallel,
    o_proj row-parallel); every head count below is this rank's.
    KV cache per layer: k_cache, v_cache [num_blocks, Hkv, block_size, D].
    Decode steps call the (selective-head) decode kernel; prefill/extend steps run SDPA over the
    sequence's cached prefix plus its new tokens.
    """

    def __init__(
        self, cfg: ModelConfig, bias: bool, out_bias: bool, rope: RotaryEmbedding | None, tp: TensorParallel = SINGLE
    ):
        super().__init__()
        self.num_heads = tp.split(cfg.num_heads, "attention heads")
        self.num_kv_heads = tp.split(cfg.num_kv_heads, "KV heads")
        self.head_dim = cfg.head_dim
        q_out, kv_out = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=bias)
        self.o_proj = RowParallelLinear(q_out, cfg.hidden_size, bias=out_bias, tp=tp)
        self.rope = rope
        self.scale = cfg.head_dim**-0.5
        self.splits = (q_out, kv_out, kv_out)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: tuple[torch.Tensor, torch.Tensor], plan: LayerPlan):
        """x: [N, d] -> [N, d]."""
        n = x.shape[0]
        q, k, v = self.qkv(x).split(self.splits, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self.rope(batch.positions, q, k)
        write_kv(kv, batch.slot_mapping, k, v)
        if batch.is_decode:
            out = self._decode(q, batch, kv, plan)
        else:
            out = prefill_attention(q, batch, kv, self.scale)
        return self.o_proj(out.reshape(n, -1))

    def _decode(self, q, batch: ForwardBatch, kv, plan: LayerPlan) -> torch.Tensor:
        out = kernels.paged_decode_attention(
            q, kv[0], kv[1], batch.block_tables, batch.context_lens, self.scale, head_idx=plan.head_idx
        )  # [B, Hq, D]
        if plan.head_mask is not None:
            out = out * plan.head_mask.unsqueeze(-1).to(out.dtype)
        return out


def write_kv(kv: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Scatter k, v [N, Hkv, D] into the paged cache at slot_mapping [N]."""
    kernels.write_kv(kv[0], kv[1], slot_mapping, k, v)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """Read the first ``length`` tokens of every sequence: cache [NB, H, bs, D] -> [B, H, length, D]."""
    bs = cache.shape[2]
    t = torch.arange(length, device=cache.device)
    blocks = block_tables[:, t // bs].long()  # [B, T]
    return cache[blocks, :, t % bs].permute(0, 2, 1, 3)  # [B, T, H, D] -> [B, H, T, D]


def prefill_attention(q: torch.Tensor, batch: ForwardBatch, kv, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    q: [N, Hq, D] flat; returns [N, Hq, D].
    """
    lay = batch.prefill_layout
    k = gather_kv(kv[0], batch.block_tables, lay.max_context)  # [B, Hkv, T, D]
    v = gather_kv(kv[1], batch.block_tables, lay.max_context)
    qp = q[lay.flat_index].transpose(1, 2)  # [B, Hq, Tq, D]
    key_pos = torch.arange(lay.max_context, device=q.device)
    mask = key_pos[None, None, :] <= lay.q_positions[:, :, None]  # [B, Tq, T]
    out = F.scaled_dot_product_attention(
        qp, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.unsqueeze(1), scale=scale,
        enable_gqa=qp.shape[1] != k.shape[1],
    )  # [B, Hq, Tq, D]
    out = out.transpose(1, 2)  # [B, Tq, Hq, D]
    return out[lay.valid]  # rows in flat order: sequences are contiguous and in order


# ----------------------------------------------------------------------------------------------
# MLPs
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """fc1 (+activation) -> fc2, dense or over a chosen set of neurons.

    relu:       w1 [I, d] (+b1 [I]),         h = relu(x W1^T + b1)
    silu_gated: w1 [2I, d] = [gate; up],      h = silu(x Wg^T) * (x Wu^T)
    w2t [I, d] is the second matrix transposed (+ b2 [d]): y = h W2t.
    Under tensor parallelism each rank owns I / tp neurons; partial outputs are summed over ranks
    before the (replicated) b2 is added.
    """

    def __init__(self, d: int, inter: int, activation: str, bias1: bool, bias2: bool, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.activation, self.inter = activation, tp.split(inter, "MLP neurons")
        inter = self.inter
        rows = 2 * inter if activation == "silu_gated" else inter
        self.w1 = nn.Parameter(torch.empty(rows, d))
        self.b1 = nn.Parameter(torch.zeros(rows)) if bias1 else None
        self.w2t = nn.Parameter(torch.empty(inter, d))
        self.b2 = nn.Parameter(torch.zeros(d)) if bias2 else None

    def forward(self, x: torch.Tensor, neuron_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, d]; neuron_idx: [k] neurons to compute (None: all) -> [N, d]."""
        if neuron_idx is not None:
            h = kernels.gather_fc1(x, self.w1, self.b1, neuron_idx, self.activation)
            if self.tp.size == 1:
                return kernels.gather_fc2(h, self.w2t, self.b2, neuron_idx)
            return self._add_bias(self.tp.all_reduce(kernels.gather_fc2(h, self.w2t, None, neuron_idx)))
        return self.down(self.activate(F.linear(x, self.w1, self.b1)))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """pre-activation [N, rows] -> neuron activity h [N, I]."""
        if self.activation == "relu":
            return F.relu(pre)
        gate, up = pre.split(self.inter, dim=-1)
        return F.silu(gate) * up

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, I] -> [N, d] (summed over tensor-parallel ranks)."""
        return self._add_bias(self.tp.all_reduce(h @ self.w2t))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.b2 is None else y + self.b2


# ----------------------------------------------------------------------------------------------
# Decoder layer
# ----------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Attention + MLP with residuals; pre-norm (LLaMA, most OPT) or post-norm (OPT-350m).

    The sparsity planner reads the attention input (pre-attention normed hidden state) and returns
    the heads and neurons this step computes; the recorder (router data collection) sees the same
    tensor plus the MLP activity and per-head attention output norms.
    """

    def __init__(self, idx: int, attn: PagedAttention, mlp: MLP, norm1: nn.Module, norm2: nn.Module, pre_norm: bool):
        super().__init__()
        self.idx, self.pre_norm = idx, pre_norm
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv) -> torch.Tensor:
        h = self.norm1(x) if self.pre_norm else x
        plan = batch.plan(self.idx, h)
        a = self.attn(h, batch, kv, plan)
        x = x + a if self.pre_norm else self.norm1(x + a)
        h = self.norm2(x) if self.pre_norm else x
        m = self.mlp(h, plan.neurons())
        return x + m if self.pre_norm else self.norm2(x + m)
