"""Teacher-forced scoring through the decode path equals dense prefill scoring (planner off)."""
from __future__ import annotations

import torch

from polarsparse.engine.engine import LLMEngine
from polarsparse.eval.scoring import Scorer, ScoreRequest
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner
from polarsparse.sparsity.bundle import RouterBundle
from tests.helpers import random_prompts


def _requests():
    """Shared contexts (as multiple-choice items have), contexts crossing block boundaries, 1-token ones."""
    ctx = random_prompts(300, [1, 31, 32, 33, 70], seed=3)
    conts = random_prompts(300, [1, 4, 9, 2, 5, 3], seed=4)
    pairs = [(ctx[1], conts[0]), (ctx[1], conts[1]), (ctx[1], conts[2]), (ctx[0], conts[3]),
             (ctx[2], conts[4]), (ctx[3], conts[5]), (ctx[4], conts[2]), (ctx[4], conts[0])]
    return [ScoreRequest(tuple(c), tuple(x)) for c, x in pairs]


def _prefill_logprobs(engine, r: ScoreRequest) -> list[float]:
    lp = torch.log_softmax(engine.prompt_logits([list(r.context + r.continuation)])[0], dim=-1)
    m = len(r.context)
    return [lp[m - 1 + j, t].item() for j, t in enumerate(r.continuation)]


def test_dense_decode_scoring_matches_full_prefill(tiny_run):
    engine = LLMEngine(str(tiny_run["model"]), device="cpu")
    reqs = _requests()
    free = engine.runner.cache.allocator.num_free
    scores = Scorer(engine, max_batch=3).score(reqs, {"d": None})["d"]
    for r, s in zip(reqs, scores):
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(_prefill_logprobs(engine, r)),
                                   atol=1e-4, rtol=1e-4)
    assert engine.runner.cache.allocator.num_free == free  # every block returned, none twice:
    again = Scorer(engine, max_batch=3).score(reqs, {"d": None})["d"]  # reuses the freed blocks
    assert [s.logprobs for s in again] == [s.logprobs for s in scores]


def test_variants_share_one_prefill_and_the_planner_is_restored(tiny_run):
    engine = LLMEngine(str(tiny_run["model"]), device="cpu")
    bundle = RouterBundle.load(tiny_run["routers"])
    cfg = engine.cfg
    sparse = RouterPlanner(bundle.layer_routers("kv"), [LayerBudget(1, 32)] * cfg.num_layers, "kv")
    seen = []
    reqs = _requests()
    out = Scorer(engine, max_batch=8).score(reqs, {"dense": None, "sparse": lambda b: seen.append(b) or sparse})
    dense_again = Scorer(engine, max_batch=8).score(reqs, {"dense": None})["dense"]
    assert [s.logprobs for s in out["dense"]] == [s.logprobs for s in dense_again]
    assert [s.total for s in out["sparse"]] != [s.total for s in out["dense"]]
    assert max(seen) <= 8 and min(seen) >= 1  # live batch sizes of the decode steps
    assert engine.runner.planner_factory is None
