"""GPU end-to-end checks of the decode engine (CUDA graphs, Triton kernels, fused small ops).

Skipped on machines without CUDA; scripts/gpu_decode.sh runs them on the GPU machine.
"""
from __future__ import annotations

import pytest
import torch

from polarsparse import LLM, SamplingParams
from polarsparse.bench.decode_sparsity import SparsitySpec, random_routers
from polarsparse.config import EngineConfig
from polarsparse.engine.engine import LLMEngine
from polarsparse.models.synthetic import random_model, synthetic_config
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner
from tests.helpers import load_hf, random_prompts, save_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


@pytest.mark.parametrize("kind", ["llama-gqa", "opt"])
def test_dense_engine_matches_transformers_greedy(kind, tmp_path):
    wide = {"hidden_size": 256}  # head dim 64: the GPU attention kernel serves 64 and 128
    family, overrides = ("llama", {"num_key_value_heads": 2}) if kind == "llama-gqa" else ("opt", {"word_embed_proj_dim": 256})
    overrides.update(wide)
    folder = save_tiny(family, tmp_path / kind, **overrides)
    llm = LLM(str(folder), dtype="float32", device="cuda", num_kv_blocks=64, block_size=16)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.capture
    hf = load_hf(folder).cuda()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompts = random_prompts(llm.engine.cfg.vocab_size, [5, 17, 9], seed=4)
    ours = _generate(llm.engine, prompts)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert got == ref[0, len(p):].tolist()


@pytest.mark.parametrize("name", ["llama-3-8b", "opt-6.7b"])
def test_sparse_engine_at_full_density_matches_dense(name):
    """Real shapes (first 4 layers, fp32 so that rounding cannot flip a near-tie): every KV group
    and every neuron chosen through the sparse path (routers, top-k, selective kernels)."""
    cfg = synthetic_config(name, num_layers=4)
    model = random_model(cfg, torch.float32, "cuda", seed=0)
    engine = LLMEngine(model, engine_config=EngineConfig(block_size=32, num_kv_blocks=512, max_num_seqs=8))
    prompts = random_prompts(cfg.vocab_size, [40, 7, 100, 65], seed=5)
    dense = _generate(engine, prompts)
    spec = SparsitySpec("full", head_density=1.0, mlp_density=1.0)
    routers = random_routers(cfg, spec, torch.float32, "cuda")
    full = [LayerBudget(cfg.num_kv_heads, cfg.intermediate_size)] * cfg.num_layers  # forced: no cost model
    engine.runner.planner_factory = lambda bucket: RouterPlanner(routers, full)
    sparse = _generate(engine, prompts)
    assert sparse == dense
    assert {k.sparse for k in engine.runner.graphs._steps} == {False, True}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_graph_replay_matches_eager_decode(name):
    cfg = synthetic_config(name)
    model = random_model(cfg, torch.float32, "cuda", seed=2)
    engine = LLMEngine(model, engine_config=EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=8))
    runner = engine.runner
    prompts = random_prompts(cfg.vocab_size, [3, 30, 12], seed=6)
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.scheduler.waiting:
        engine.step()  # prefill
    batch = engine.scheduler.schedule()
    assert batch.is_decode and len(batch.seqs) == 3
    graphs, runner.graphs = runner.graphs, None
    want = runner.execute(batch).clone()
    runner.graphs = graphs
    got = runner.execute(batch)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
