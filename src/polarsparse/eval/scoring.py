"""Teacher-forced log-likelihood through the engine's real decode path (the deployed semantics).

For a request (context c_1..c_m, continuation x_1..x_n):

* c_1..c_{m-1} are prefilled densely (prefill never runs sparse);
* c_m, x_1, ..., x_{n-1} are fed one decode step at a time through ``ModelRunner.execute`` with the
  runner's ``planner_factory`` active, so every scored token x_j is predicted by a (sparse) decode
  step, with heads chosen per sequence and the MLP top-k taken from the table row of the live batch
  size (many requests decode together; the batch shrinks as short continuations finish).

This is slightly stricter than serving, where the first output token comes from the dense prefill.
Several planner variants (dense, sparse settings) are scored on one shared prefill: decode steps
never write below a sequence's prefix length, so the prefix KV blocks are reused, and contexts shared
by several choices of a question are prefilled once.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm.auto import tqdm

from polarsparse.engine.runner import PlannerFactory
from polarsparse.engine.sampling import SamplingParams
from polarsparse.engine.scheduler import ScheduledBatch
from polarsparse.engine.sequence import Sequence
from polarsparse.errors import PolarsparseError

log = logging.getLogger(__name__)


class ScoringError(PolarsparseError, ValueError):
    """A scoring request the engine cannot run (empty, too long for the context or the KV cache)."""


@dataclass(frozen=True)
class ScoreRequest:
    context: tuple[int, ...]  # >= 1 token
    continuation: tuple[int, ...]  # >= 1 token


@dataclass
class TokenScores:
    """Per-token log-probabilities of a continuation and whether greedy decoding reproduces it."""

    logprobs: list[float] = field(default_factory=list)
    greedy: bool = True

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class _Prefix:
    tokens: tuple[int, ...]  # the prefilled part of a context (all but its last token)
    blocks: list[int]


class Scorer:
    """Scores ScoreRequests on an LLMEngine (used beside, not inside, its scheduler).

    max_batch: sequences decoded together (the live batch size the MLP top-k sees).
    prefill_tokens: tokens per dense prefill call.
    """

    def __init__(self, engine, max_batch: int = 64, prefill_tokens: int = 4096):
        self.engine, self.runner = engine, engine.runner
        self.cache = engine.runner.cache
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens

    def score(
        self,
        requests: list[ScoreRequest],
        variants: dict[str, PlannerFactory | None],
        desc: str = "score",
    ) -> dict[str, list[TokenScores]]:
        """Scores of every request under every planner variant (None = dense decode)."""
        self._validate(requests)
        out: dict[str, list[TokenScores | None]] = {name: [None] * len(requests) for name in variants}
        total = sum(len(r.continuation) for r in requests) * len(variants)
        with tqdm(total=total, desc=desc, unit="tok", leave=False) as bar:
            for chunk in self._chunks(requests):
                with self._prefilled([requests[i] for i in chunk]) as prefixes:
                    for name, factory in variants.items():
                        scores = self._decode([requests[i] for i in chunk], prefixes, factory, bar)
                        for i, s in zip(chunk, scores):
                            out[name][i] = s
        return out  # type: ignore[return-value]

    # -- validation and chunking ----------------------------------------------------------------
    def _validate(self, requests: list[ScoreRequest]) -> None:
        limit = self.engine.max_model_len
        for i, r in enumerate(requests):
            if not r.context or not r.continuation:
                raise ScoringError(f"request {i}: context and continuation must each have >= 1 token")
            if len(r.context) + len(r.continuation) > limit:
                raise ScoringError(f"request {i} has {len(r.context) + len(r.continuation)} tokens; "
                                   f"the model's context is {limit}")

    def _blocks(self, r: ScoreRequest) -> int:
        """Upper bound on the blocks one request needs (prefix blocks counted as if private)."""
        return self.cache.blocks_for(len(r.context) + len(r.continuation)) + 1

    def _chunks(self, requests: list[ScoreRequest]) -> Iterator[list[int]]:
        """Request indices in groups of about max_batch sequences that fit the free KV blocks.

        Requests sharing a prefix stay together (one prefill); groups are ordered by continuation
        length so that a chunk's sequences finish at about the same step (the batch stays full).
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.context[:-1], []).append(i)
        ordered = sorted(groups.values(), key=lambda g: max(len(requests[i].continuation) for i in g))
        budget = self.cache.allocator.num_free
        chunk: list[int] = []
        used = 0
        for group in ordered:
            need = sum(self._blocks(requests[i]) for i in group)
            if need > budget:
                raise ScoringError(f"request {group[0]} (with {len(group) - 1} sharing its context) needs {need} "
                                   f"KV blocks; the cache has {budget} free")
            if chunk and (used + need > budget or len(chunk) + len(group) > self.max_batch):
                yield chunk
                chunk, used = [], 0
            chunk += group
            used += need
        if chunk:
            yield chunk

    # -- prefill --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _prefilled(self, requests: list[ScoreRequest]) -> Iterator[dict[tuple[int, ...], _Prefix]]:
        """Prefill every distinct prefix densely once; free its blocks on exit."""
        keys = list(dict.fromkeys(r.context[:-1] for r in requests))
        with dense_prefill(self.runner, keys, self.prefill_tokens) as blocks:
            yield {k: _Prefix(k, b) for k, b in zip(keys, blocks)}

    # -- decode ---------------------------------------------------------------------------------
    def _decode(self, requests: list[ScoreRequest], prefixes: dict, factory: PlannerFactory | None,
                bar) -> list[TokenScores]:
        seqs: list[Sequence] = []
        owned: list[list[int]] = []  # private blocks of each fork (shared prefix blocks belong to the prefix)
        scores = [TokenScores() for _ in requests]
        try:
            for r in requests:
                seq, private = self._fork(r, prefixes[r.context[:-1]])
                seqs.append(seq)
                owned.append(private)
            with _planner(self.runner, factory):
                active = list(range(len(requests)))
                while active:
                    self._decode_step([seqs[i] for i in active], [requests[i] for i in active],
                                      [scores[i] for i in active])
                    bar.update(len(active))
                    active = [i for i in active if len(scores[i].logprobs) < len(requests[i].continuation)]
        finally:
            for blocks in owned:
                self.cache.allocator.free(blocks)
        return scores

    def _decode_step(self, seqs: list[Sequence], requests: list[ScoreRequest], scores: list[TokenScores]):
        logits = self.runner.execute(ScheduledBatch(seqs, True, [1] * len(seqs)))  # [B, V] fp32
        targets = torch.tensor([r.continuation[len(s.logprobs)] for r, s in zip(requests, scores)],
                               device=logits.device)  # [B]
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].tolist()
        hits = (logits.argmax(dim=-1) == targets).tolist()
        for seq, sc, target, lp, hit in zip(seqs, scores, targets.tolist(), logp, hits):
            sc.logprobs.append(lp)
            sc.greedy = sc.greedy and hit
            seq.num_computed += 1
            seq.output_token_ids.append(target)

    def _fork(self, r: ScoreRequest, prefix: _Prefix) -> tuple[Sequence, list[int]]:
        """A sequence reading the shared prefix blocks, with a private copy of a partial last block;
        returns it and its private blocks."""
        bs, plen = self.cache.block_size, len(prefix.tokens)
        shared = prefix.blocks[: plen // bs]
        private = self.cache.allocator.allocate(self.cache.blocks_for(plen + len(r.continuation)) - len(shared))
        if plen % bs:
            self.runner.copy_blocks([(prefix.blocks[plen // bs], private[0])])  # on every tensor-parallel rank
        return _sequence(r.context, shared + private, plen), private


@contextlib.contextmanager
def dense_prefill(runner, prompts: list[tuple[int, ...]], max_tokens: int = 4096) -> Iterator[list[list[int]]]:
    """Write the KV of every prompt into freshly allocated blocks with dense prefill calls of at most
    ``max_tokens`` tokens (one call per group of prompts); yield the block lists, free them on exit.

    No logits are computed. Forward hooks on the model see every prompt token exactly once, in the
    order of ``prompts`` within each call.
    """
    cache = runner.cache
    blocks: list[list[int]] = []
    try:
        for p in prompts:
            blocks.append(cache.allocator.allocate(cache.blocks_for(len(p))))
        group: list[Sequence] = []
        tokens = 0
        for p, b in zip(prompts, blocks):
            if not p:
                continue
            if group and tokens + len(p) > max_tokens:
                _prefill_call(runner, group)
                group, tokens = [], 0
            group.append(_sequence(p + (0,), b, 0))  # the extra token is never fed: no logits
            tokens += len(p)
        if group:
            _prefill_call(runner, group)
        yield blocks
    finally:
        for b in blocks:
            cache.allocator.free(b)


def _prefill_call(runner, seqs: list[Sequence]) -> None:
    runner.execute(ScheduledBatch(seqs, False, [s.num_tokens - 1 for s in seqs]))  # prefill never routes


def _sequence(tokens: tuple[int, ...], blocks: list[int], computed: int) -> Sequence:
    seq = Sequence("score", 0, list(tokens), SamplingParams(max_tokens=1))
    seq.block_table, seq.num_computed = list(blocks), computed
    return seq


@contextlib.contextmanager
def _planner(runner, factory: PlannerFactory | None):
    """Decode under ``factory`` for the block. Scoring with the engine's own factory changes
    nothing, which is what a tensor-parallel engine (whose ranks cannot switch planners) needs."""
    saved = runner.planner_factory
    if factory is saved:
        yield
        return
    runner.planner_factory = factory
    try:
        yield
    finally:
        runner.planner_factory = saved
