"""Scheduler policy on a simulated model (no tensors): admission, chunking, fairness, preemption."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polarsparse.config import EngineConfig
from polarsparse.engine.kv_cache import BlockAllocator
from polarsparse.engine.sampling import SamplingParams
from polarsparse.engine.scheduler import AdmissionError, Scheduler
from polarsparse.engine.sequence import Sequence

BLOCK = 16


class BlocksOnly:
    """The part of KVCache the scheduler uses: block bookkeeping, no tensors."""

    def __init__(self, num_blocks: int):
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = BLOCK

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // BLOCK)


def make(num_blocks=64, max_len=1024, **ecfg) -> Scheduler:
    return Scheduler(EngineConfig(block_size=BLOCK, **ecfg), BlocksOnly(num_blocks), max_len)


def seq(prompt_len: int, max_tokens: int = 4, rid: str = "r") -> Sequence:
    return Sequence(rid, 0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, temperature=0))


def step(s: Scheduler):
    """One engine step without a model: every sampling sequence appends token 7."""
    batch = s.schedule()
    if batch is None:
        return None
    sampling = [q for i, q in enumerate(batch.seqs) if batch.is_decode or batch.samples(i)]
    s.commit(batch)
    for q in sampling:
        q.output_token_ids.append(7)
        if len(q.output_token_ids) >= q.params.max_tokens:
            q.finish("length")
            s.release(q)
    return batch


def run_to_end(s: Scheduler, limit: int = 10_000) -> list:
    batches = []
    for _ in range(limit):
        if not s.has_work:
            return batches
        b = step(s)
        assert b is not None, "scheduler has work but scheduled nothing (deadlock)"
        batches.append(b)
        check_blocks(s)
    raise AssertionError("did not finish")


def check_blocks(s: Scheduler) -> None:
    """No block is owned twice or both owned and free; every computed token has a block."""
    owned = [b for q in list(s.running) + list(s.waiting) for b in q.block_table]
    assert len(owned) == len(set(owned))
    assert len(owned) + s.cache.allocator.num_free == s.cache.allocator.num_usable
    for q in list(s.running) + list(s.waiting):
        assert len(q.block_table) * BLOCK >= q.num_computed


def test_admission_rejects_what_can_never_run():
    s = make(num_blocks=5, max_len=100)
    with pytest.raises(AdmissionError, match="empty"):
        s.add(seq(0))
    with pytest.raises(AdmissionError, match="context"):
        s.add(seq(100))
    with pytest.raises(AdmissionError, match="KV blocks"):
        s.add(seq(64))  # 65 tokens need 5 blocks, 4 usable
    s.add(seq(63))
    assert s.num_unfinished == 1


def test_prefill_first_then_decode_and_new_requests_join_between_decode_steps():
    s = make()
    a = seq(10, max_tokens=5)
    s.add(a)
    b1 = step(s)
    assert not b1.is_decode and b1.seqs == [a] and b1.query_lens == [10]
    assert step(s).is_decode
    b = seq(20, max_tokens=3)
    s.add(b)
    b3 = step(s)
    assert not b3.is_decode and b3.seqs == [b]
    b4 = step(s)
    assert b4.is_decode and b4.seqs == [a, b]


def test_long_prompt_is_chunked_by_token_budget():
    s = make(max_num_batched_tokens=32)
    a = seq(80, max_tokens=2)
    s.add(a)
    lens = []
    while a.num_computed < 80:
        b = step(s)
        assert not b.is_decode
        lens.append(b.query_lens[0])
    assert lens == [32, 32, 16]
    assert a.output_token_ids == [7]  # sampled only when the whole prompt was in


def test_decode_is_not_starved_by_a_stream_of_arrivals():
    s = make(max_num_batched_tokens=16)
    first = seq(8, max_tokens=50, rid="first")
    s.add(first)
    step(s)
    kinds = []
    for i in range(10):
        s.add(seq(16, max_tokens=50, rid=f"late{i}"))
        kinds.append(step(s).is_decode)
    assert kinds.count(True) >= 5  # at least every other step decodes
    assert len(first.output_token_ids) >= 6


def test_max_num_seqs_caps_the_running_batch():
    s = make(max_num_seqs=3)
    for i in range(5):
        s.add(seq(4, max_tokens=10, rid=str(i)))
    step(s)
    assert len(s.running) == 3 and len(s.waiting) == 2
    assert len(step(s).seqs) == 3


def test_exhaustion_preempts_and_recomputes_without_losing_requests():
    s = make(num_blocks=9)  # 8 usable blocks = 128 tokens
    seqs = [seq(30, max_tokens=40, rid=str(i)) for i in range(6)]  # 70 tokens each, 5 blocks
    for q in seqs:
        s.add(q)
    batches = run_to_end(s)
    assert all(len(q.output_token_ids) == 40 and q.finish_reason == "length" for q in seqs)
    assert s.num_preemptions > 0 and any(b.preempted for b in batches)
    assert s.cache.allocator.num_free == s.cache.allocator.num_usable


def test_waiting_partial_prefill_gives_blocks_back_instead_of_deadlocking():
    s = make(num_blocks=7, max_num_batched_tokens=16)  # 6 usable blocks
    old = seq(40, max_tokens=40, rid="old")
    s.add(old)
    run_until = lambda cond: [step(s) for _ in range(200) if not cond()]  # noqa: E731
    run_until(lambda: old.status.value == "running")
    young = seq(60, max_tokens=4, rid="young")  # its chunks take the blocks "old" will need
    s.add(young)
    run_to_end(s)
    assert len(old.output_token_ids) == 40 and len(young.output_token_ids) == 4
    assert s.counters.reclaims > 0


def test_sequence_larger_than_the_whole_cache_ends_with_length():
    s = make(num_blocks=3, max_len=1000)  # 2 usable blocks = 32 tokens
    a = seq(20, max_tokens=100)
    s.add(a)
    run_to_end(s)
    assert a.finish_reason == "length" and len(a.output_token_ids) == 32 - 20 + 1  # last token needs no KV
    assert s.cache.allocator.num_free == 2


def test_release_frees_blocks_at_once_wherever_the_sequence_is():
    s = make(max_num_batched_tokens=16)
    running, partial = seq(8, max_tokens=50, rid="a"), seq(64, max_tokens=5, rid="b")
    s.add(running)
    step(s)
    s.add(partial)
    step(s)  # decode
    step(s)  # first chunk of b
    assert partial.block_table and partial in s.waiting
    s.release(partial)
    s.release(running)
    assert not s.has_work and s.cache.allocator.num_free == s.cache.allocator.num_usable


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 40)), min_size=1, max_size=10),
    num_blocks=st.integers(8, 24),
    budget=st.sampled_from([8, 16, 64, 8192]),
    max_seqs=st.integers(1, 6),
)
def test_random_workloads_always_finish_with_every_token(lens, num_blocks, budget, max_seqs):
    s = make(num_blocks=num_blocks, max_len=128, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    seqs = [seq(p, max_tokens=m, rid=str(i)) for i, (p, m) in enumerate(lens)]
    for q in seqs:
        s.add(q)
    run_to_end(s)
    usable_tokens = (num_blocks - 1) * BLOCK
    for q in seqs:
        assert q.finished
        fits = q.num_tokens <= usable_tokens
        assert len(q.output_token_ids) == q.params.max_tokens or (not fits and q.finish_reason == "length")
    assert s.cache.allocator.num_free == s.cache.allocator.num_usable


def test_allocator_refuses_double_free_and_foreign_blocks():
    alloc = BlockAllocator(6)
    got = alloc.allocate(3)
    alloc.free(got[:1])
    for bad in (got[:1], [0], [6], [got[1], got[1]]):
        with pytest.raises(RuntimeError, match="freed twice or never allocated"):
            alloc.free(bad)
    assert alloc.num_free == 3  # the refused calls freed nothing
    alloc.free(got[1:])
    assert alloc.num_free == 5 and sorted(alloc.allocate(5)) == [1, 2, 3, 4, 5]
