"""The lm-eval adapter on a local task: same numbers as our own scorer.

lm_eval is not a dependency: when it is missing, a minimal stand-in for ``lm_eval.api.model.LM``
(the only part the adapter uses) is installed for the test.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest

from polarsparse import LLM
from polarsparse.eval.lm_eval_adapter import LMEvalUnavailable, lm_eval_model
from polarsparse.eval.scoring import Scorer, ScoreRequest
from polarsparse.eval.tasks import load_mc_task

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@dataclass
class Instance:  # the part of lm_eval.api.instance.Instance the adapter reads
    args: tuple


@pytest.fixture
def lm_eval_api(monkeypatch):
    if HAVE_LM_EVAL:
        return
    model = types.ModuleType("lm_eval.api.model")

    class LM:  # abstract base with the three request types
        def __init__(self):
            self._rank, self._world_size = 0, 1

    model.LM = LM
    for name, mod in (("lm_eval", types.ModuleType("lm_eval")), ("lm_eval.api", types.ModuleType("lm_eval.api")),
                      ("lm_eval.api.model", model)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    with pytest.raises(LMEvalUnavailable, match="pip install lm-eval"):
        lm_eval_model(llm=object())


def test_adapter_scores_a_local_task_like_our_scorer(tiny_run, lm_eval_api):
    llm = LLM(str(tiny_run["model"]), device="cpu", routers=str(tiny_run["routers"]))
    lm = lm_eval_model(llm, batch_size=8)
    assert type(lm).__mro__[-2].__name__ == "LM"
    items = load_mc_task("arc_easy", 3)
    pairs = [(c.context, c.continuation) for item in items for c in item.choices]
    got = lm.loglikelihood([Instance(p) for p in pairs])
    tok = llm.tokenizer
    reqs = [ScoreRequest(tuple(tok.encode(c)), tuple(tok.encode(x, add_special_tokens=False))) for c, x in pairs]
    want = Scorer(llm.engine, 8).score(reqs, {"s": llm.engine.runner.planner_factory})["s"]
    assert [(s.total, s.greedy) for s in want] == got


def test_rolling_loglikelihood_and_generation(tiny_run, lm_eval_api):
    llm = LLM(str(tiny_run["model"]), device="cpu")
    lm = lm_eval_model(llm, max_length=16)
    text = "The farmer kept horses in a barn near the river and a kitten above it."
    (total,) = lm.loglikelihood_rolling([Instance((text,))])
    n = len(llm.tokenizer.encode(text, add_special_tokens=False))
    assert total < 0 and total / n > -10  # every token scored once, none twice (~log(320) each)
    (full,) = lm.generate_until([Instance(("the barn", {"until": ["zzz"], "max_gen_toks": 5}))])
    (cut,) = lm.generate_until([Instance(("the barn", {"until": [full[2:4]], "max_gen_toks": 5}))])
    assert full and full.startswith(cut) and len(cut) < len(full)
