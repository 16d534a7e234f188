"""Task data, metric aggregation, variant parsing and a small `polarsparse eval` run."""
from __future__ import annotations

import json
import math

import pytest

from polarsparse.config import SparsityConfig
from polarsparse.eval.cli import VariantError, parse_variant
from polarsparse.eval.harness import lambada_metrics, mc_metrics, perplexity_metrics
from polarsparse.eval.scoring import TokenScores
from polarsparse.eval.tasks import Choice, EvalDataError, MCItem, load_corpus, load_lambada, load_mc_task
from tests.sparsity.tiny import run_cli


def test_real_task_data_loads():
    piqa = load_mc_task("piqa", 5)
    assert len(piqa) == 5 and all(len(i.choices) == 2 and i.gold in (0, 1) for i in piqa)
    assert piqa[0].choices[0].context.startswith("Goal:")
    wino = load_mc_task("winogrande", 3)
    assert wino[0].choices[0].context != wino[0].choices[1].context  # the option is in the context
    assert load_lambada(2)[0].continuation.startswith(" ")


def test_training_and_evaluation_text_are_disjoint():
    train, evaluation = set(load_corpus("train")), set(load_corpus("eval"))
    assert len(train) > 1000 and len(evaluation) > 5000
    assert not train & evaluation


def test_unknown_task_and_corpus_are_clear_errors():
    with pytest.raises(EvalDataError, match="unknown task"):
        load_mc_task("nope")
    with pytest.raises(EvalDataError, match="unknown corpus"):
        load_corpus("nope")


def _scores(*totals):
    return [TokenScores([t]) for t in totals]


def test_mc_metrics_raw_and_per_char():
    items = [MCItem(0, (Choice("q", " a"), Choice("q", " bbbbbbbb")), gold=1),
             MCItem(1, (Choice("q", " a"), Choice("q", " b")), gold=0)]
    m = mc_metrics(items, _scores(-2.0, -3.0, -1.0, -5.0), "acc_per_char")
    assert m["acc_raw"] == 0.5  # item 0: raw picks the short choice, wrongly
    assert m["acc_per_char"] == 1.0 and m["primary"] == 1.0


def test_perplexity_and_lambada_metrics():
    ppl = perplexity_metrics([TokenScores([-1.0, -3.0]), TokenScores([-2.0])])
    assert math.isclose(ppl["ppl"], math.exp(2.0))
    lam = lambada_metrics([TokenScores([-0.1], True), TokenScores([-2.0, -1.0], False)])
    assert lam["acc"] == 0.5


def test_parse_variant():
    assert parse_variant("dense") is None
    assert parse_variant("default") == SparsityConfig()
    v = parse_variant("query:0.3+mlp+importance")
    assert (v.head_unit, v.head_density, v.mlp, v.head_budget, v.attention) == ("query", 0.3, True, "importance", True)
    assert parse_variant("mlp:0.5") == SparsityConfig(attention=False, mlp=True, mlp_density=0.5)
    with pytest.raises(VariantError):
        parse_variant("heads:0.5")


def test_eval_cli_small_run_dense_vs_sparse(tiny_run, tmp_path, capsys):
    out = tmp_path / "acc.json"
    rc = run_cli("eval", "--model", tiny_run["model"], "--device", "cpu", "--routers", tiny_run["routers"],
                 "--tasks", "ppl,lambada,piqa", "--limit", 6, "--ppl-windows", 2, "--ppl-window", 48,
                 "--ppl-context", 16, "--variants", "dense,kv:0.5,query:0.25+mlp", "--json", out,
                 "--markdown", tmp_path / "acc.md")
    assert rc == 0
    table = capsys.readouterr().out
    assert "| piqa | 6 | acc_per_char |" in table and "mean zero-shot" in table
    res = json.loads(out.read_text())
    assert res["meta"]["variants"] == ["dense", "kv:0.5", "query:0.25+mlp"]
    ppl = res["tasks"]["ppl"]
    assert ppl["scored_tokens"] == 2 * 32 and ppl["items"] == 2
    assert ppl["metrics"]["dense"]["ppl"] != ppl["metrics"]["query:0.25+mlp"]["ppl"]
    assert (tmp_path / "acc.md").read_text().startswith("Command: `polarsparse eval")
    assert run_cli("eval", "--from-json", out, "--markdown", tmp_path / "merged.md") == 0
    merged = (tmp_path / "merged.md").read_text()
    assert res["meta"]["command"] in merged and "| piqa | 6 | acc_per_char |" in merged


def test_sparse_variants_without_routers_are_refused(tiny_run, capsys):
    rc = run_cli("eval", "--model", tiny_run["model"], "--device", "cpu", "--tasks", "piqa", "--limit", 1,
                 "--variants", "dense,kv:0.5")
    assert rc == 2 and "need --routers" in capsys.readouterr().err
