"""The embedded real model (SmolLM2-135M-Instruct) against transformers, on real prompts."""
from __future__ import annotations

import pytest
import torch

from polarsparse import LLM, SamplingParams
from polarsparse.models.embedded import default_model_dir
from tests.helpers import load_hf

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def pair():
    llm = LLM(dtype="float32", device="cpu", num_kv_blocks=128)
    return llm, load_hf(default_model_dir())


def test_logits_match_transformers(pair):
    llm, hf = pair
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    for p, got in zip(prompts, llm.prompt_logits(prompts)):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


def test_greedy_32_tokens_match_transformers_and_batching(pair):
    llm, hf = pair
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    hf.generation_config.eos_token_id = None
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
    single = llm.generate([PROMPTS[1]], params)[0]
    assert single.outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert "Paris" in outs[0].outputs[0].text
