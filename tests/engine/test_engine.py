"""Engine behaviour on a tiny LLaMA with the real tokenizer: sampling, stopping, batching, memory."""
from __future__ import annotations

import pytest

from polarsparse import LLM, SamplingParams
from polarsparse.engine.sampling import SamplingParamsError
from polarsparse.engine.scheduler import AdmissionError
from tests.helpers import add_default_tokenizer, random_prompts, save_tiny

VOCAB = 49152
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = save_tiny("llama", tmp_path_factory.mktemp("tiny"), vocab_size=VOCAB, num_key_value_heads=2)
    return add_default_tokenizer(f)


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=64, block_size=16)


def prompts(n=4, seed=3):
    return random_prompts(VOCAB, [3 + 7 * i for i in range(n)], seed=seed)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    ps = prompts()
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=10, seed=7, ignore_eos=True)
    batched = tokens(llm.generate(ps, params))
    assert batched == tokens(llm.generate(ps, params))
    assert tokens(llm.generate([ps[2]], params)) == [batched[2]]
    other = tokens(llm.generate(ps, SamplingParams(temperature=0.9, max_tokens=10, seed=8, ignore_eos=True)))
    assert other != batched


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    ps = prompts()
    greedy = tokens(llm.generate(ps, GREEDY))
    for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True, seed=1),
                   SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=12, ignore_eos=True, seed=1)):
        assert tokens(llm.generate(ps, params)) == greedy


def test_n_samples_differ_and_have_the_right_count(llm):
    out = llm.generate(prompts(1), SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=0, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_max_tokens_stop_token_and_stop_string(llm):
    p = prompts(1)[0]
    base = llm.generate([p], GREEDY)[0].outputs[0]
    assert len(base.token_ids) == 12 and base.finish_reason == "length"
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    stop_str = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    if stop_str.strip():
        out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop=[stop_str]))[0].outputs[0]
        assert out.finish_reason == "stop" and stop_str not in out.text
        assert base.text.startswith(out.text)


def test_preemption_and_chunked_prefill_do_not_change_tokens(folder, llm):
    ps = prompts(6)
    ref = tokens(llm.generate(ps, GREEDY))
    small = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=9, block_size=16,
                max_num_batched_tokens=16)
    out = tokens(small.generate(ps, GREEDY))
    assert out == ref
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.runner.cache.allocator.num_free == small.engine.runner.cache.allocator.num_usable


def test_bad_requests_raise_clear_errors(llm):
    with pytest.raises(AdmissionError, match="context"):
        llm.generate([[5] * 300], GREEDY)
    with pytest.raises(AdmissionError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(AdmissionError, match="token ids"):
        llm.generate([[VOCAB + 5]], GREEDY)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0), dict(n=100),
                dict(top_k=1.5), dict(stop=[""]), dict(seed="x")):
        with pytest.raises(SamplingParamsError):
            SamplingParams(**bad)
    assert llm.engine.runner.cache.allocator.num_free == llm.engine.runner.cache.allocator.num_usable


def test_rejected_batch_leaves_nothing_queued(llm):
    with pytest.raises(AdmissionError):
        llm.generate([prompts(1)[0], [5] * 300], GREEDY)
    assert not llm.engine.has_unfinished()
    assert llm.engine.runner.cache.allocator.num_free == llm.engine.runner.cache.allocator.num_usable


def test_close_releases_the_kv_cache(folder):
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=8, block_size=16)
    llm.generate(prompts(1), GREEDY)
    llm.close()
    assert llm.engine.runner.cache.layers == []
