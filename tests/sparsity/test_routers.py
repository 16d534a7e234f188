"""Router shapes for MHA and GQA, and planners that follow the live batch size."""
from __future__ import annotations

import pytest
import torch

from polarsparse.models.loader import load_config
from polarsparse.sparsity.bundle import RouterBundle
from polarsparse.sparsity.planner import BundlePlanners, LayerBudget, RouterPlanner
from polarsparse.sparsity.train import StackedRouters, export_tensors


def _bundle_for(cfg, rank=8) -> RouterBundle:
    """Untrained routers of the right shapes for a config (what train exports)."""
    stacked = StackedRouters(cfg.num_layers, cfg.hidden_size, rank, cfg.intermediate_size, cfg.num_heads,
                             cfg.num_kv_heads)
    zeros, ones = torch.zeros(cfg.num_layers, cfg.hidden_size), torch.ones(cfg.num_layers, cfg.hidden_size)
    manifest = {"model": {"num_layers": cfg.num_layers}}
    return RouterBundle(manifest, export_tensors(stacked, zeros, ones))


@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_router_output_shapes(which, tiny_run, tiny_opt):
    cfg = load_config(tiny_run["model"] if which == "gqa" else tiny_opt)
    bundle = _bundle_for(cfg)
    h = torch.randn(5, cfg.hidden_size)
    kv, query = bundle.layer_routers("kv"), bundle.layer_routers("query")
    for i in range(cfg.num_layers):
        assert kv[i].head(h).shape == (5, cfg.num_kv_heads)
        assert query[i].head(h).shape == (5, cfg.num_heads)
        assert kv[i].mlp(h).shape == (5, cfg.intermediate_size)
    assert (cfg.num_kv_heads < cfg.num_heads) == (which == "gqa")


def test_planner_serves_kv_groups_as_indices_and_query_heads_as_a_mask(tiny_run):
    cfg = load_config(tiny_run["model"])
    bundle = _bundle_for(cfg)
    h = torch.randn(3, cfg.hidden_size)
    budgets = [LayerBudget(1, 32)] * cfg.num_layers
    kv_plan = RouterPlanner(bundle.layer_routers("kv"), budgets, "kv").plan(1, h)
    assert kv_plan.head_idx.shape == (3, 1) and kv_plan.head_mask is None
    assert kv_plan.neuron_idx.shape == (32,) and torch.all(kv_plan.neuron_idx.diff() > 0)
    q_plan = RouterPlanner(bundle.layer_routers("query"), budgets, "query").plan(1, h)
    assert q_plan.head_mask.shape == (3, cfg.num_heads) and q_plan.head_idx is None
    assert q_plan.head_mask.sum(dim=1).tolist() == [1, 1, 1]


def test_planner_factory_picks_the_next_bucket_up_from_the_live_batch_size(tiny_run):
    cfg = load_config(tiny_run["model"])
    routers = _bundle_for(cfg).layer_routers("kv")
    n = cfg.num_layers
    mlp_k = {1: [16] * n, 2: [32] * n, 4: [48] * n, 8: [None] * n}
    factory = BundlePlanners(routers, [None] * n, mlp_k)
    assert [factory.budgets(b)[0].mlp_k for b in (1, 2, 3, 4, 5)] == [16, 32, 48, 48, None]
    assert factory(8) is None  # every layer dense: no planner at all
    assert factory(3).budgets[0].mlp_k == 48
