"""Continuous batching: which sequences run in the next step (pure CPU policy, no tensors).

Each step is either a prefill step (new or preempted sequences feed their uncomputed tokens, long
prompts in chunks of at most ``max_num_batched_tokens``) or a decode step (every running sequence
feeds its last token). New requests join the running batch between decode steps; to keep streams
smooth, at most ``max_prefill_streak`` prefill steps run back to back while sequences are decoding
(so a burst of arrivals cannot stall every running stream for many steps).

KV blocks are the only admission currency. When a decode step needs a block and none is free, the
scheduler first takes back blocks held by partly prefilled waiting sequences (youngest first), then
preempts the most recently admitted running sequence: its blocks are freed and it is recomputed
later from its tokens, so nothing is lost. A sequence that could not fit even in the whole cache
ends with finish reason "length".
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


@dataclass
class SchedulerCounters:
    """Running totals since start (read by metrics; plain ints, safe to read from another thread)."""

    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0  # running sequences sent back to recompute
    reclaims: int = 0  # partly prefilled waiting sequences whose blocks were taken back


class Scheduler:
    def __init__(self, ecfg: EngineConfig, cache: KVCache, max_model_len: int, max_prefill_streak: int = 1):
        self.ecfg, self.cache, self.max_model_len = ecfg, cache, max_model_len
        self.max_prefill_streak = max_prefill_streak
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.counters = SchedulerCounters()
        self._prefill_streak = 0

    @property
    def num_preemptions(self) -> int:
        return self.counters.preemptions

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
        if self.running and self._prefill_streak >= self.max_prefill_streak:
            batch = self._schedule_decode()
            if batch is not None:
                return self._counted(batch)
        batch = self._schedule_prefill() or self._schedule_decode()
        return self._counted(batch) if batch is not None else None

    def _counted(self, batch: ScheduledBatch) -> ScheduledBatch:
        if batch.is_decode:
            self._prefill_streak = 0
            self.counters.decode_steps += 1
        else:
            self._prefill_streak += 1
            self.counters.prefill_steps += 1
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget, seqs, lens = self.ecfg.max_num_batched_tokens, [], []
        while self.waiting and budget > 0 and len(self.running) + len(seqs) < self.ecfg.max_num_seqs:
            seq = self.waiting[0]
            chunk = min(seq.num_uncomputed, budget)
            if not self._reserve_or_reclaim(seq, seq.num_computed + chunk, protect=1):
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
            if self.cache.blocks_for(seq.num_tokens) > self.cache.allocator.num_usable:
                seq.finish("length")  # the whole cache cannot hold it
                self.release(seq)
                finished.append(seq)
                continue
            while not self._reserve_or_reclaim(seq, seq.num_tokens, protect=0):
                victim = self.running[-1]  # youngest; older ones were scheduled before it
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append(seq)
        if not scheduled and not preempted and not finished:
            return None
        return ScheduledBatch(scheduled, True, [1] * len(scheduled), preempted, finished)

    def _reserve_or_reclaim(self, seq: Sequence, num_tokens: int, protect: int) -> bool:
        """Reserve blocks, taking them back from partly prefilled waiting sequences if needed.

        The first ``protect`` waiting sequences keep their blocks (the head being scheduled).
        """
        while not self._reserve(seq, num_tokens):
            if not self._reclaim_one(protect):
                return False
        return True

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure ``seq`` owns blocks for its first ``num_tokens`` tokens."""
        missing = self.cache.blocks_for(num_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > self.cache.allocator.num_free:
            return False
        seq.block_table.extend(self.cache.allocator.allocate(missing))
        return True

    def _reclaim_one(self, protect: int) -> bool:
        """Free the blocks of the youngest partly prefilled waiting sequence (it restarts its prefill)."""
        for i in range(len(self.waiting) - 1, protect - 1, -1):
            seq = self.waiting[i]
            if seq.block_table:
                self._drop_cache(seq)
                self.counters.reclaims += 1
                log.debug("reclaimed KV blocks of waiting sequence %s", seq.seq_id)
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._drop_cache(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted sequence %s (%d tokens) for KV blocks", seq.seq_id, seq.num_tokens)

    def _drop_cache(self, seq: Sequence) -> None:
        self.cache.allocator.free(seq.block_table)
        seq.block_table, seq.num_computed = [], 0

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
