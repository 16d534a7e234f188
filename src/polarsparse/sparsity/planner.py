"""Turns router outputs into a LayerPlan for one decode step (what each layer reads).

All work stays on the device with static shapes (k is fixed for a batch-size bucket), so a plan can
be captured inside a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from polarsparse import kernels
from polarsparse.models.batch import DENSE_PLAN, LayerPlan
from polarsparse.sparsity.sharding import sharded_head_topk, sharded_union_topk

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(batch_size: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket >= batch_size (the largest bucket beyond it)."""
    for b in buckets:
        if b >= batch_size:
            return b
    return buckets[-1]


def head_k(units: int, density: float) -> int:
    """Units kept for a density fraction: ceil(density * units), at least 1."""
    return max(1, min(units, math.ceil(density * units - 1e-9)))


def head_budgets(units: int, num_layers: int, density: float, mode: str = "uniform",
                 importance: list[list[float]] | None = None) -> list[int | None]:
    """Head units kept per layer (None: dense). Layer 0 is always dense.

    uniform: ceil(density * units) in every other layer.
    importance: the uniform total (ceil(density * units) per layer), spread by measured importance:
    every layer keeps >= 1 unit and the remaining units go to the layers whose next-strongest unit
    carries the largest mean share of the attention output norm (``importance[layer]``: shares of the
    1st, 2nd, ... strongest unit).
    """
    k = head_k(units, density)
    if mode == "uniform" or importance is None:
        per_layer = [k] * num_layers
    else:
        total = k * (num_layers - 1)
        extra = sorted(((importance[i][j], i) for i in range(1, num_layers) for j in range(1, units)), reverse=True)
        per_layer = [1] * num_layers
        for _, i in extra[: max(0, total - (num_layers - 1))]:
            per_layer[i] += 1
    return [None] + [None if k >= units else k for k in per_layer[1:]]


def mlp_k_for_density(neurons: int, density: float, multiple: int) -> int | None:
    """A fixed MLP top-k for a density, rounded up to ``multiple`` (None: dense)."""
    k = min(neurons, -(-math.ceil(density * neurons) // multiple) * multiple)
    return None if k >= neurons else k


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

    def __init__(self, routers: nn.ModuleList, budgets: list[LayerBudget], head_unit: str = "kv", shards: int = 1):
        """shards > 1: budgets are per shard and each of ``shards`` contiguous shards of the units and
        neurons selects its own top-k (tensor-parallel semantics on one device)."""
        self.routers, self.budgets, self.head_unit, self.shards = routers, budgets, head_unit, shards
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def _head_topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        if self.shards == 1:
            return kernels.head_topk(scores, k)
        return sharded_head_topk(scores, k, self.shards)

    def _union_topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        if self.shards == 1:
            return kernels.mlp_union_topk(scores, k)
        return sharded_union_topk(scores, k, self.shards)

    def plan(self, layer_idx: int, h: torch.Tensor, live: torch.Tensor | None = None) -> LayerPlan:
        budget, r = self.budgets[layer_idx], self.routers[layer_idx]
        if budget.head_k is None and budget.mlp_k is None:
            return DENSE_PLAN
        plan = LayerPlan()
        if budget.head_k is not None and r.head is not None:
            scores = r.head(h.to(r.head.proj.weight.dtype))  # [B, units]
            chosen = self._head_topk(scores, budget.head_k)  # [B, k]
            if self.head_unit == "kv":
                plan.head_idx = chosen
            else:
                plan.head_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
        if budget.mlp_k is not None and r.mlp is not None:
            self._route_mlp(plan, r.mlp, h, budget.mlp_k, live)
        return plan

    def _route_mlp(self, plan: LayerPlan, router: nn.Module, h: torch.Tensor, k: int,
                   live: torch.Tensor | None) -> None:
        """MLP router + batch-union top-k over the live rows (padding rows score -inf). On CUDA
        they run on a side stream, beside the layer's attention (they need only ``h``); the MLP
        joins it (LayerPlan.neurons). The union top-k is one small program, so it costs the
        attention GEMMs and kernels almost nothing."""
        def route() -> torch.Tensor:
            scores = router(h.to(router.down.weight.dtype))  # [B, I]
            if live is not None:
                scores = scores.masked_fill(~live[:, None], float("-inf"))
            return self._union_topk(scores, k)

        if not h.is_cuda:
            plan.neuron_idx = route()
            return
        main = torch.cuda.current_stream(h.device)
        side = self._side.setdefault(h.device, torch.cuda.Stream(h.device))
        side.wait_stream(main)  # h is ready; also orders this layer's routing after the last layer's MLP
        with torch.cuda.stream(side):
            plan.neuron_idx = route()
        plan.neuron_stream, plan.routed_from = side, h


class BundlePlanners:
    """A PlannerFactory over per-bucket budgets: ``factory(batch_size)`` returns the RouterPlanner of
    ``bucket_for(batch_size)`` (the next bucket up from the live batch size), or None when every layer
    of that bucket is dense.

    routers: per-layer LayerRouters. head_k: units kept per layer (None: dense), the same for every
    bucket. mlp_k: bucket -> neurons kept per layer (None: dense).
    """

    def __init__(self, routers: nn.ModuleList, head_k: list[int | None], mlp_k: dict[int, list[int | None]],
                 head_unit: str = "kv", shards: int = 1):
        self.buckets = tuple(sorted(mlp_k))
        self.table = {b: [LayerBudget(h, m) for h, m in zip(head_k, mlp_k[b])] for b in self.buckets}
        self.planners = {b: RouterPlanner(routers, budgets, head_unit, shards) for b, budgets in self.table.items()
                         if any(x.head_k is not None or x.mlp_k is not None for x in budgets)}

    def budgets(self, batch_size: int) -> list[LayerBudget]:
        return self.table[bucket_for(batch_size, self.buckets)]

    def __call__(self, batch_size: int) -> RouterPlanner | None:
        return self.planners.get(bucket_for(batch_size, self.buckets))
