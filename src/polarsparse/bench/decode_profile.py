"""Where a decode step's time goes: each op of every layer timed alone at the step's real shapes.

Ops are timed with bench.roofline.time_cuda (graph replay, cold L2, minus the fixed cost of a replay),
once per distinct shape (layers with the same budget share a timing) and summed over layers. What the measured step spends beyond
their sum is the rest: norms, RoPE, KV writes, residual adds, embedding and the gaps between the
step's kernels.
"""
from __future__ import annotations

import torch

from polarsparse import kernels
from polarsparse.bench.roofline import launch_floor, time_cuda
from polarsparse.models.base import CausalLM
from polarsparse.models.batch import DENSE_PLAN, ForwardBatch
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner

OTHER = "other (norms, RoPE, KV write, residuals, launch gaps)"


def profile_ops(model: CausalLM, kv_layers: list, fb: ForwardBatch, planner: RouterPlanner | None,
                step_s: float, reps: int = 20) -> dict[str, float]:
    """Milliseconds per step by op for the decode step described by ``fb`` (static buffers).

    Each timing is a graph replay minus the fixed cost of a replay (roofline.launch_floor).
    """
    cfg, w = model.cfg, model.lm_head_weight()
    batch = fb.num_seqs
    h = torch.randn(batch, cfg.hidden_size, dtype=w.dtype, device=w.device)  # stand-in normed hidden state
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim, dtype=w.dtype, device=w.device)
    floor = launch_floor(w.device)
    cache: dict[tuple, float] = {}
    ms = dict.fromkeys(("attention", "qkv + o projections", "MLP", "router GEMMs", "top-k (heads, MLP union)"), 0.0)

    def timed(key: tuple, fn) -> float:
        if key not in cache:
            cache[key] = max(0.0, time_cuda(fn, reps=reps) - floor) * 1e3
        return cache[key]

    for i, layer in enumerate(model.layers):
        budget = planner.budgets[i] if planner is not None else LayerBudget(None, None)
        plan = planner.plan(i, h) if planner is not None else DENSE_PLAN
        plan.neurons()  # join the side stream the MLP routing ran on
        k_cache, v_cache = kv_layers[i]
        attn = layer.attn
        ms["attention"] += timed(("attn", budget.head_k), lambda: kernels.paged_decode_attention(
            q, k_cache, v_cache, fb.block_tables, fb.context_lens, attn.scale, head_idx=plan.head_idx))
        ms["qkv + o projections"] += timed(("proj",), lambda: attn.o_proj(attn.qkv(h)[:, : cfg.num_heads * cfg.head_dim]))
        ms["MLP"] += timed(("mlp", budget.mlp_k), lambda: layer.mlp(h, plan.neuron_idx))
        routers = planner.routers[i] if planner is not None else None
        if plan.head_idx is not None:
            scores = routers.head(h)
            ms["router GEMMs"] += timed(("head router",), lambda: routers.head(h))
            ms["top-k (heads, MLP union)"] += timed(("head top-k", budget.head_k),
                                                    lambda: kernels.head_topk(scores, budget.head_k))
        if plan.neuron_idx is not None:
            logits = routers.mlp(h)
            ms["router GEMMs"] += timed(("mlp router",), lambda: routers.mlp(h))
            ms["top-k (heads, MLP union)"] += timed(("mlp top-k", budget.mlp_k),
                                                    lambda: kernels.mlp_union_topk(logits, budget.mlp_k))
    ms["LM head + final norm"] = timed(("head",), lambda: model.compute_logits(model.final(h)))
    ms[OTHER] = step_s * 1e3 - sum(ms.values())
    return ms
