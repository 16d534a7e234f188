"""Continuous batching: which sequences run in the next step (pure CPU policy, no tensors).

Each step is either a prefill step (new or preempted sequences feed their uncomputed tokens, long
prompts in chunks of at most ``max_num_batched_tokens``) or a decode step (every running sequence
feeds its last token). Prefill goes first so new requests join the running batch between decode
steps. When a decode step needs a KV block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it is recomputed later from its tokens (nothing is lost).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from polarsparse.config import EngineConfig
from polarsparse.engine.kv_cache import KVCache
from polarsparse.engine.sequence import Sequence, Status
from polarsparse.errors import PolarsparseError

log = logging.getLogger(__name__)


class AdmissionError(PolarsparseError, ValueError):
    """A request that can never run (too long for the context or for the whole KV cache)."""


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_decode: bool
    query_lens: list[int]  # tokens each sequence feeds this step
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler (cache full)

    def samples(self, i: int) -> bool:
        """Does sequence i produce a token this step (its prompt is complete after the step)?"""
        s = self.seqs[i]
        return s.num_computed + self.query_lens[i] == s.num_tokens


class Scheduler:
    def __init__(self, ecfg: EngineConfig, cache: KVCache, max_model_len: int):
        self.ecfg, self.cache, self.max_model_len = ecfg, cache, max_model_len
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- admission --------------------------------------------------------------------------
    def check_admissible(self, prompt_len: int) -> None:
        if prompt_len < 1:
            raise AdmissionError("the prompt is empty")
        if prompt_len >= self.max_model_len:
            raise AdmissionError(
                f"prompt has {prompt_len} tokens; the model's context is {self.max_model_len} "
                f"(prompt must be at most {self.max_model_len - 1} tokens to generate anything)"
            )
        need = self.cache.blocks_for(prompt_len + 1)
        if need > self.cache.allocator.num_usable:
            raise AdmissionError(
                f"prompt of {prompt_len} tokens needs {need} KV blocks but the cache has only "
                f"{self.cache.allocator.num_usable}; raise kv_cache_memory / num_kv_blocks"
            )

    def add(self, seq: Sequence) -> None:
        self.check_admissible(len(seq.prompt_token_ids))
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget, seqs, lens = self.ecfg.max_num_batched_tokens, [], []
        while self.waiting and budget > 0 and len(self.running) + len(seqs) < self.ecfg.max_num_seqs:
            seq = self.waiting[0]
            chunk = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, seq.num_computed + chunk):
                break
            seqs.append(seq)
            lens.append(chunk)
            budget -= chunk
            if chunk < seq.num_uncomputed:
                break  # chunked: this sequence continues first next step
            self.waiting.popleft()
        if not seqs:
            return None
        return ScheduledBatch(seqs, False, lens)

    def _schedule_decode(self) -> ScheduledBatch | None:
        preempted: list[Sequence] = []
        scheduled: list[Sequence] = []
        finished: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while not self._reserve(seq, seq.num_tokens):
                victim = self.running[-1]
                if victim is seq and len(scheduled) == 0 and len(self.running) == 1:
                    seq.finish("length")  # alone and still no room: the cache is full
                    self.release(seq)
                    finished.append(seq)
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append(seq)
        if not scheduled and not preempted and not finished:
            return None
        return ScheduledBatch(scheduled, True, [1] * len(scheduled), preempted, finished)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure ``seq`` owns blocks for its first ``num_tokens`` tokens."""
        missing = self.cache.blocks_for(num_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > self.cache.allocator.num_free:
            return False
        seq.block_table.extend(self.cache.allocator.allocate(missing))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.allocator.free(seq.block_table)
        seq.block_table, seq.num_computed, seq.status = [], 0, Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted sequence %s (%d tokens) for KV blocks", seq.seq_id, seq.num_tokens)

    # -- after a step -----------------------------------------------------------------------
    def commit(self, batch: ScheduledBatch) -> None:
        """Record that the step's tokens are now in the cache; promote finished prefills."""
        for i, seq in enumerate(batch.seqs):
            done = batch.samples(i)
            seq.num_computed += batch.query_lens[i]
            if not batch.is_decode and done:
                seq.status = Status.RUNNING
                self.running.append(seq)

    def release(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks and drop it from the queues."""
        self.cache.allocator.free(seq.block_table)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
