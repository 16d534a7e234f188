"""Run EleutherAI lm-evaluation-harness tasks against a polarsparse engine.

``lm_eval`` is imported only when the adapter class is built (``pip install lm-eval``)::

    import lm_eval
    from polarsparse.eval.lm_eval_adapter import lm_eval_model
    lm = lm_eval_model(routers="default", sparsity={"head_density": 0.5})
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"], limit=100)

Log-likelihood requests use the same deployed semantics as ``polarsparse eval`` (dense prefill of
the context, every continuation token scored by a decode step with the engine's planner active);
generation uses ``LLM.generate``.
"""
from __future__ import annotations

import importlib

from polarsparse.errors import PolarsparseError
from polarsparse.eval.scoring import Scorer, ScoreRequest

LM_EVAL_HINT = "the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval"


class LMEvalUnavailable(PolarsparseError, ImportError):
    """lm_eval is not installed."""


class EngineRequests:
    """lm-eval's three request types on a polarsparse ``LLM`` (no lm_eval import here).

    llm: an ``LLM``; its engine's planner (dense or sparse) is what gets evaluated.
    """

    def __init__(self, llm, batch_size: int = 64, max_length: int | None = None):
        self.llm, self.engine = llm, llm.engine
        self.scorer = Scorer(self.engine, max_batch=batch_size)
        self.max_length = min(max_length or self.engine.max_model_len, self.engine.max_model_len)
        tok = self.engine.tokenizer
        self.prefix_token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _score(self, requests: list[ScoreRequest]):
        return self.scorer.score(requests, {"model": self.engine.runner.planner_factory}, desc="lm-eval")["model"]

    def _encode(self, context: str, continuation: str) -> ScoreRequest:
        tok = self.engine.tokenizer
        ctx = tok.encode(context) if context else [self.prefix_token]
        cont = tok.encode(continuation, add_special_tokens=False)
        keep = max(1, self.max_length - len(cont))  # left-truncate long contexts
        return ScoreRequest(tuple(ctx[-keep:]), tuple(cont))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Each request's ``args`` = (context, continuation) -> (log-likelihood, is greedy)."""
        scores = self._score([self._encode(*r.args[:2]) for r in requests])
        return [(s.total, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each request's ``args`` = (text,) -> total log-likelihood of the whole text, scored in
        windows of half the context length, each conditioned on up to the preceding half."""
        tok = self.engine.tokenizer
        step = max(1, self.max_length // 2)
        pieces: list[ScoreRequest] = []
        owners: list[int] = []
        for n, r in enumerate(requests):
            ids = [self.prefix_token] + tok.encode(r.args[0], add_special_tokens=False)
            for start in range(1, len(ids), step):
                pieces.append(ScoreRequest(tuple(ids[max(0, start - step):start]), tuple(ids[start:start + step])))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, s in zip(owners, self._score(pieces)):
            totals[owner] += s.total
        return totals

    def generate_until(self, requests) -> list[str]:
        """Each request's ``args`` = (context, gen_kwargs) with lm-eval's ``until``, ``max_gen_toks``,
        ``do_sample``, ``temperature``."""
        from polarsparse.engine.sampling import SamplingParams

        prompts, params = [], []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            prompts.append(context)
            params.append(SamplingParams(max_tokens=int(kw.get("max_gen_toks", 256)), temperature=temperature,
                                         stop=[until] if isinstance(until, str) else list(until)))
        return [o.outputs[0].text for o in self.llm.generate(prompts, params)]


def lm_eval_model(llm=None, batch_size: int = 64, max_length: int | None = None, **llm_kwargs):
    """An ``lm_eval.api.model.LM`` for ``llm`` (or for ``LLM(**llm_kwargs)``, e.g. model=, routers=,
    sparsity=, device=)."""
    try:
        base = importlib.import_module("lm_eval.api.model").LM
    except ImportError as e:
        raise LMEvalUnavailable(f"{LM_EVAL_HINT} ({e})") from e

    class PolarsparseLM(EngineRequests, base):
        def __init__(self):
            base.__init__(self)
            if llm is None:
                from polarsparse.engine.llm import LLM

                engine_llm = LLM(**llm_kwargs)
            else:
                engine_llm = llm
            EngineRequests.__init__(self, engine_llm, batch_size, max_length)

    return PolarsparseLM()
