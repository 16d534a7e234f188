"""Perplexity and zero-shot accuracy of one engine under several sparsity variants at once.

Every task becomes a list of ScoreRequests (context, continuation) scored by
:class:`~polarsparse.eval.scoring.Scorer` under every variant on a shared dense prefill, so the
variants see exactly the same items and tokens (paired comparison).

* ``ppl``: LAMBADA passages (evaluation text, never used for router training) concatenated and cut
  into windows of ``ppl_window`` tokens; the first ``ppl_context`` tokens of a window are context
  and the rest are scored: perplexity = exp(mean NLL of the scored tokens).
* ``lambada``: last-word accuracy (the word is predicted greedily, token by token) and its mean NLL.
* multiple-choice tasks: log-likelihood of every choice; ``acc_raw`` picks the highest total,
  ``acc_per_char`` the highest total per character of the choice; ``primary`` is the task's
  primary metric in the OLMo evaluation configuration.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from polarsparse.engine.runner import PlannerFactory
from polarsparse.eval.scoring import Scorer, ScoreRequest, TokenScores
from polarsparse.eval.tasks import MC_TASKS, check_tasks, load_corpus, load_lambada, load_mc_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    limit: int | None = 200  # items per task (None: all)
    batch_size: int = 64  # sequences decoded together
    ppl_windows: int = 32
    ppl_window: int = 256
    ppl_context: int = 128


@dataclass
class TaskResult:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> metric -> value
    items: int = 0
    scored_tokens: int = 0
    seconds: float = 0.0


def _encode(tok, context: str, continuation: str, max_len: int) -> ScoreRequest:
    """Token ids of a (context, continuation) pair; contexts too long for the model lose their start."""
    cont = tok.encode(continuation, add_special_tokens=False)
    ctx = tok.encode(context)
    return ScoreRequest(tuple(ctx[-max(1, max_len - len(cont)):]), tuple(cont))


# ----------------------------------------------------------------------------------------------
# task builders: (requests, aggregate(scores) -> metrics)
# ----------------------------------------------------------------------------------------------
def perplexity_requests(tok, s: EvalSettings) -> list[ScoreRequest]:
    eos = tok.eos_token_id
    stream: list[int] = []
    need = s.ppl_windows * s.ppl_window
    for doc in load_corpus("eval"):
        stream += tok.encode(doc, add_special_tokens=False) + [eos]
        if len(stream) >= need:
            break
    windows = [stream[i:i + s.ppl_window] for i in range(0, len(stream) - s.ppl_window + 1, s.ppl_window)]
    return [ScoreRequest(tuple(w[:s.ppl_context]), tuple(w[s.ppl_context:])) for w in windows[: s.ppl_windows]]


def perplexity_metrics(scores: list[TokenScores]) -> dict[str, float]:
    n = sum(len(sc.logprobs) for sc in scores)
    nll = -sum(sc.total for sc in scores) / n
    return {"ppl": math.exp(nll), "nll": nll, "primary": math.exp(nll)}


def lambada_metrics(scores: list[TokenScores]) -> dict[str, float]:
    acc = sum(sc.greedy for sc in scores) / len(scores)
    return {"acc": acc, "nll": -sum(sc.total for sc in scores) / len(scores), "primary": acc}


def mc_metrics(items, scores: list[TokenScores], primary: str) -> dict[str, float]:
    raw = norm = 0
    pos = 0
    for item in items:
        chunk = scores[pos:pos + len(item.choices)]
        pos += len(item.choices)
        totals = [sc.total for sc in chunk]
        per_char = [t / max(1, len(c.continuation)) for t, c in zip(totals, item.choices)]
        raw += max(range(len(totals)), key=totals.__getitem__) == item.gold
        norm += max(range(len(per_char)), key=per_char.__getitem__) == item.gold
    m = {"acc_raw": raw / len(items), "acc_per_char": norm / len(items)}
    m["primary"] = m[primary]
    return m


@dataclass
class TaskSpec:
    requests: list[ScoreRequest]
    aggregate: Callable[[list[TokenScores]], dict[str, float]]
    items: int


def build_task(task: str, tok, s: EvalSettings, max_len: int) -> TaskSpec:
    if task == "ppl":
        requests = perplexity_requests(tok, s)
        return TaskSpec(requests, perplexity_metrics, len(requests))
    if task == "lambada":
        requests = [_encode(tok, c.context, c.continuation, max_len) for c in load_lambada(s.limit)]
        return TaskSpec(requests, lambada_metrics, len(requests))
    items = load_mc_task(task, s.limit)
    requests = [_encode(tok, c.context, c.continuation, max_len) for item in items for c in item.choices]
    return TaskSpec(requests, lambda scores: mc_metrics(items, scores, MC_TASKS[task]), len(items))


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def evaluate(engine, tasks: list[str], variants: dict[str, PlannerFactory | None],
             s: EvalSettings) -> dict[str, TaskResult]:
    """task -> TaskResult with metrics for every variant."""
    check_tasks(tasks)
    scorer = Scorer(engine, max_batch=s.batch_size)
    results: dict[str, TaskResult] = {}
    for task in tasks:
        t0 = time.perf_counter()
        spec = build_task(task, engine.tokenizer, s, engine.max_model_len)
        scores = scorer.score(spec.requests, variants, desc=task)
        res = TaskResult(items=spec.items, scored_tokens=sum(len(r.continuation) for r in spec.requests))
        res.metrics = {name: spec.aggregate(sc) for name, sc in scores.items()}
        res.seconds = time.perf_counter() - t0
        results[task] = res
        log.info("%s: %s (%.0f s)", task, {k: round(v["primary"], 4) for k, v in res.metrics.items()}, res.seconds)
    return results
