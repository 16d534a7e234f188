"""End to end on a tiny model: collect -> train -> calibrate (the session fixture) -> sparse generate."""
from __future__ import annotations

from polarsparse import LLM, SamplingParams
from polarsparse.sparsity.bundle import RouterBundle
from tests.sparsity.tiny import run_cli


def test_generate_with_the_trained_bundle_uses_the_table_row_of_the_live_batch_size(tiny_run):
    llm = LLM(str(tiny_run["model"]), device="cpu", routers=str(tiny_run["routers"]), sparsity={"mlp": True})
    factory = llm.engine.runner.planner_factory
    assert factory is not None
    asked = []
    llm.engine.runner.planner_factory = lambda b: asked.append(b) or factory(b)
    outs = llm.generate(["the barn", "Question: What is", "fox"], SamplingParams(max_tokens=6, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert 3 in asked  # three sequences decode together: the bucket-4 row serves them
    table = RouterBundle.load(tiny_run["routers"]).calibration["mlp_k"]["4"]
    assert [b.mlp_k for b in factory.budgets(3)] == table


def test_head_density_override_reaches_the_planner(tiny_run):
    llm = LLM(str(tiny_run["model"]), device="cpu", routers=str(tiny_run["routers"]),
              sparsity={"head_density": 0.25, "head_unit": "query", "mlp": False})
    budgets = llm.engine.runner.planner_factory.budgets(1)
    assert [b.head_k for b in budgets] == [None, 1]  # 4 query heads at 25%; layer 0 dense
    assert all(b.mlp_k is None for b in budgets)
    assert "heads query 25%" in llm.engine.sparse_setup.describe()


def test_cli_generate_says_which_routers_it_uses(tiny_run, capsys):
    rc = run_cli("generate", "--model", tiny_run["model"], "--device", "cpu", "--routers", tiny_run["routers"],
                 "--prompt", "the barn", "--max-tokens", 4, "--head-density", 0.5)
    err = capsys.readouterr().err
    assert rc == 0 and f"routers {tiny_run['routers']}" in err and "heads kv 50%" in err
    rc = run_cli("generate", "--model", tiny_run["model"], "--device", "cpu", "--prompt", "the barn",
                 "--max-tokens", 2)
    assert rc == 0 and "dense (no routers)" in capsys.readouterr().err
