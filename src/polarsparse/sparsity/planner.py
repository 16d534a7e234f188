"""Turns router outputs into a LayerPlan for one decode step (what each layer reads).

All work stays on the device with static shapes (k is fixed for a batch-size bucket), so a plan can
be captured inside a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polarsparse import kernels
from polarsparse.models.batch import DENSE_PLAN, LayerPlan

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(batch_size: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket >= batch_size (the largest bucket beyond it)."""
    for b in buckets:
        if b >= batch_size:
            return b
    return buckets[-1]


@dataclass(frozen=True)
class LayerBudget:
    """How much of one layer a step reads. None means dense for that part."""

    head_k: int | None  # units (KV groups or query heads) kept per sequence
    mlp_k: int | None  # neurons kept for the whole batch (batch union)


class RouterPlanner:
    """SparsePlanner for one batch-size bucket.

    routers: per-layer LayerRouters (index = layer). budgets: per-layer LayerBudget for this bucket.
    head_unit: "kv" (select KV groups; what the kernel serves) or "query" (select query heads; a
    mask on the reference path, for accuracy studies of finer granularity).
    """

    def __init__(self, routers: nn.ModuleList, budgets: list[LayerBudget], head_unit: str = "kv"):
        self.routers, self.budgets, self.head_unit = routers, budgets, head_unit

    def plan(self, layer_idx: int, h: torch.Tensor) -> LayerPlan:
        budget, r = self.budgets[layer_idx], self.routers[layer_idx]
        if budget.head_k is None and budget.mlp_k is None:
            return DENSE_PLAN
        plan = LayerPlan()
        if budget.head_k is not None and r.head is not None:
            scores = r.head(h.to(r.head.proj.weight.dtype))  # [B, units]
            chosen = kernels.head_topk(scores, budget.head_k)  # [B, k]
            if self.head_unit == "kv":
                plan.head_idx = chosen
            else:
                plan.head_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
        if budget.mlp_k is not None and r.mlp is not None:
            plan.neuron_idx = kernels.mlp_union_topk(r.mlp(h.to(r.mlp.down.weight.dtype)), budget.mlp_k)
        return plan
