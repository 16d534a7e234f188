"""Where a decode step's time goes: each op of every layer timed alone at the step's real shapes.

Ops are timed with bench.roofline.time_cuda (graph replay, cold L2), once per distinct shape (layers
with the same budget share a timing) and summed over layers. What the measured step spends beyond
their sum is the rest: norms, RoPE, KV writes, residual adds, embedding and the gaps between the
step's kernels.
"""
from __future__ import annotations

import torch

from polarsparse import kernels
from polarsparse.bench.roofline import time_cuda
from polarsparse.models.base import CausalLM
from polarsparse.models.batch import DENSE_PLAN, ForwardBatch
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner

OTHER = "other (norms, RoPE, KV write, residuals, launch gaps)"


def profile_ops(model: CausalLM, kv_layers: list, fb: ForwardBatch, planner: RouterPlanner | None,
                step_s: float, reps: int = 20) -> dict[str, float]:
    """Milliseconds per step by op for the decode step described by ``fb`` (static buffers)."""
    cfg, w = model.cfg, model.lm_head_weight()
    batch = fb.num_seqs
    h = torch.randn(batch, cfg.hidden_size, dtype=w.dtype, device=w.device)  # stand-in normed hidden state
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim, dtype=w.dtype, device=w.device)
    cache: dict[tuple, float] = {}
    ms = {"attention": 0.0, "qkv + o projections": 0.0, "MLP": 0.0, "routers + top-k": 0.0}

    def timed(key: tuple, fn) -> float:
        if key not in cache:
            cache[key] = time_cuda(fn, reps=reps) * 1e3
        return cache[key]

    for i, layer in enumerate(model.layers):
        budget = planner.budgets[i] if planner is not None else LayerBudget(None, None)
        plan = planner.plan(i, h) if planner is not None else DENSE_PLAN
        k_cache, v_cache = kv_layers[i]
        attn = layer.attn
        ms["attention"] += timed(("attn", budget.head_k), lambda: kernels.paged_decode_attention(
            q, k_cache, v_cache, fb.block_tables, fb.context_lens, attn.scale, head_idx=plan.head_idx))
        ms["qkv + o projections"] += timed(("proj",), lambda: attn.o_proj(attn.qkv(h)[:, : cfg.num_heads * cfg.head_dim]))
        ms["MLP"] += timed(("mlp", budget.mlp_k), lambda: layer.mlp(h, plan.neuron_idx))
        if budget.head_k is not None or budget.mlp_k is not None:
            ms["routers + top-k"] += timed(("router", budget.head_k is None, budget.mlp_k is None),
                                           lambda: planner.plan(i, h))
    ms["LM head + final norm"] = timed(("head",), lambda: model.compute_logits(model.final(h)))
    ms[OTHER] = step_s * 1e3 - sum(ms.values())
    return ms
