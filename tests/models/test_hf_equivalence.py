"""Our models vs Hugging Face transformers: logits (fp32) and greedy tokens, batched and alone."""
from __future__ import annotations

import pytest
import torch

from polarsparse import LLM, SamplingParams
from tests.helpers import load_hf, random_prompts, save_tiny

LENGTHS = [5, 17, 9]
CASES = {
    "llama-mha": ("llama", {}),
    "llama-gqa": ("llama", {"num_key_value_heads": 2}),
    "llama3-rope-scaling-gqa": (
        "llama",
        {"num_key_value_heads": 1, "tie_word_embeddings": True, "rope_theta": 500000.0,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2-bias-gqa": ("qwen2", {"num_key_value_heads": 2}),
    "mistral-gqa": ("mistral", {"num_key_value_heads": 2, "sliding_window": None}),
    "opt": ("opt", {}),
    "opt-350m-style": ("opt", {"word_embed_proj_dim": 32, "do_layer_norm_before": False}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    folder = save_tiny(kind, tmp_path_factory.mktemp(request.param), **overrides)
    return LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=64, block_size=16), load_hf(folder)


def test_prompt_logits_match_transformers(tiny):
    llm, hf = tiny
    prompts = random_prompts(llm.engine.cfg.vocab_size, LENGTHS)
    ours = llm.prompt_logits(prompts)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_greedy_tokens_match_transformers_generate(tiny):
    llm, hf = tiny
    prompts = random_prompts(llm.engine.cfg.vocab_size, LENGTHS, seed=2)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batched = llm.generate(prompts, params)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    for p, out in zip(prompts, batched):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert out.outputs[0].token_ids == ref[0, len(p):].tolist()
        assert out.outputs[0].finish_reason == "length"
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert alone == [o.outputs[0].token_ids for o in batched]
