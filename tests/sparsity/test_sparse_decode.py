"""The sparse decode path (reference kernels on CPU): exact at full density, live when sparse."""
from __future__ import annotations

import pytest
import torch

from polarsparse import LLM, SamplingParams
from polarsparse.sparsity.bundle import RouterBundle
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner
from tests.helpers import random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class Recording:
    """A planner factory that records the batch sizes it is asked for."""

    def __init__(self, planner):
        self.planner, self.sizes = planner, []

    def __call__(self, batch_size):
        self.sizes.append(batch_size)
        return self.planner


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def _full_budgets(cfg, unit):
    units = cfg.num_kv_heads if unit == "kv" else cfg.num_heads
    return [LayerBudget(units, cfg.intermediate_size)] * cfg.num_layers


@pytest.mark.parametrize("unit", ["kv", "query"])
@pytest.mark.parametrize("which", ["llama", "opt"])
def test_full_density_through_the_sparse_path_gives_exactly_the_dense_tokens(which, unit, tiny_run, tiny_opt):
    model_dir = tiny_run["model"] if which == "llama" else tiny_opt
    llm = LLM(str(model_dir), device="cpu")
    prompts = random_prompts(300, [5, 17, 33])
    dense = _tokens(llm, prompts)
    routers = RouterBundle.load(tiny_run["routers"]) if which == "llama" else None
    if routers is None:  # OPT: untrained routers of the right shapes are enough at full density
        from tests.sparsity.test_routers import _bundle_for

        routers = _bundle_for(llm.engine.cfg)
    factory = Recording(RouterPlanner(routers.layer_routers(unit), _full_budgets(llm.engine.cfg, unit), unit))
    llm.engine.runner.planner_factory = factory
    assert _tokens(llm, prompts) == dense
    assert factory.sizes and set(factory.sizes) <= {1, 2, 3}  # decode steps asked with the live batch size


def test_sparse_settings_change_the_computation(tiny_run):
    llm = LLM(str(tiny_run["model"]), device="cpu")
    prompts = random_prompts(300, [9, 21])
    dense = _tokens(llm, prompts)
    bundle = RouterBundle.load(tiny_run["routers"])
    cfg = llm.engine.cfg
    budgets = [LayerBudget(1, cfg.intermediate_size // 8)] * cfg.num_layers
    llm.engine.runner.planner_factory = lambda b: RouterPlanner(bundle.layer_routers("kv"), budgets, "kv")
    assert _tokens(llm, prompts) != dense


def test_prefill_stays_dense(tiny_run):
    """One-token outputs come from the prefill alone: identical with any planner."""
    llm = LLM(str(tiny_run["model"]), device="cpu")
    prompts = random_prompts(300, [12, 30])
    one = SamplingParams(max_tokens=1, temperature=0.0)
    dense = [o.outputs[0].token_ids for o in llm.generate(prompts, one)]
    llm.engine.runner.planner_factory = lambda b: pytest.fail("a prefill step asked for a planner")
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, one)] == dense
