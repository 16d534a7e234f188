"""A router bundle drives the CUDA-graph decode path (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from polarsparse import LLM, SamplingParams
from tests.helpers import random_prompts
from tests.sparsity.tiny import VOCAB, save_tiny_with_tokenizer, synthetic_bundle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_bundle_planners_run_inside_cuda_graphs(tmp_path):
    folder = save_tiny_with_tokenizer("llama", tmp_path / "model", hidden_size=256)  # head dim 64
    bundle = synthetic_bundle(folder, tmp_path / "routers")
    prompts = random_prompts(VOCAB, [5, 9, 17, 3, 30])
    kw = dict(dtype="float32", device="cuda", num_kv_blocks=64, block_size=16)
    dense = _tokens(LLM(str(folder), **kw), prompts)
    full = LLM(str(folder), routers=str(bundle), sparsity={"head_density": 1.0, "mlp": True}, **kw)
    assert full.engine.runner.graphs is not None and full.engine.runner.planner_factory is not None
    assert _tokens(full, prompts) == dense  # every neuron through the gather kernels: same tokens
    half = LLM(str(folder), routers=str(bundle), sparsity={"head_density": 0.5, "mlp": True}, **kw)
    assert [len(t) for t in _tokens(half, prompts)] == [16] * len(prompts)
