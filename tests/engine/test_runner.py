"""The padded static-buffer decode step (what CUDA graphs replay) against the plain eager step.

On CPU the static path runs eagerly with the reference kernels, so these tests check the padding,
bucketing, block-table widths and planner handling without a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from polarsparse import SamplingParams
from polarsparse.config import EngineConfig
from polarsparse.engine.cuda_graphs import StepKey, width_for
from polarsparse.engine.engine import LLMEngine
from polarsparse.engine.kv_cache import NULL_BLOCK
from polarsparse.engine.runner import ModelRunner
from polarsparse.engine.scheduler import ScheduledBatch
from polarsparse.engine.sequence import Sequence
from polarsparse.models.synthetic import random_model, synthetic_config
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner
from polarsparse.sparsity.routers import HeadRouter, LayerRouters, MLPRouter

BLOCK = 16


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-opt"])
def model(request):
    return random_model(synthetic_config(request.param), torch.float32, "cpu", seed=3)


def _runner(model, static: bool) -> ModelRunner:
    ecfg = EngineConfig(block_size=BLOCK, num_kv_blocks=96, max_num_seqs=16)
    return ModelRunner(model, ecfg, torch.float32, torch.device("cpu"), static_decode=static)


def _prefilled(runner: ModelRunner, lengths: list[int], seed: int = 0) -> list[Sequence]:
    """Sequences whose prompts (random tokens) are in the cache, ready for a decode step."""
    g = torch.Generator().manual_seed(seed)
    vocab = runner.cfg.vocab_size
    seqs = [Sequence(f"r{i}", 0, torch.randint(3, vocab, (n,), generator=g).tolist(), SamplingParams()) for i, n in enumerate(lengths)]
    for s in seqs:
        s.block_table = runner.cache.allocator.allocate(runner.cache.blocks_for(s.num_tokens + 4))
    logits = runner.execute(ScheduledBatch(seqs, False, [s.num_tokens for s in seqs]))
    for s, row in zip(seqs, logits):
        s.num_computed = s.num_tokens
        s.output_token_ids.append(int(row.argmax()))
    return seqs


def _decode(runner: ModelRunner, seqs: list[Sequence]) -> torch.Tensor:
    return runner.execute(ScheduledBatch(seqs, True, [1] * len(seqs))).clone()


def _random_planner(model, head_k: int | None, mlp_k: int | None) -> RouterPlanner:
    cfg = model.cfg
    torch.manual_seed(0)
    routers = nn.ModuleList(
        LayerRouters(HeadRouter(cfg.hidden_size, cfg.num_kv_heads), MLPRouter(cfg.hidden_size, 8, cfg.intermediate_size))
        for _ in range(cfg.num_layers)
    )
    return RouterPlanner(routers, [LayerBudget(head_k, mlp_k)] * cfg.num_layers)


@pytest.mark.parametrize("lengths", [[7], [5, 33, 16], [2, 9, 17, 31, 40]])
@pytest.mark.parametrize("sparse", [False, True])
def test_padded_static_step_matches_eager(model, lengths, sparse):
    runner = _runner(model, static=False)
    if sparse:  # per-sequence head choice + all neurons: padding rows cannot change live rows
        planner = _random_planner(model, max(1, model.cfg.num_kv_heads // 2), model.cfg.intermediate_size)
        runner.planner_factory = lambda batch_size: planner
    seqs = _prefilled(runner, lengths)
    want = _decode(runner, seqs)  # eager, unpadded
    graphs = runner.use_static_decode()
    got = _decode(runner, seqs)  # rewrites the same KV slots, padded to the bucket
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    bucket = {1: 1, 3: 4, 5: 8}[len(lengths)]
    width = width_for(max(len(s.block_table) for s in seqs), BLOCK, graphs.max_width)
    assert StepKey(bucket, width, sparse) in graphs._steps


@pytest.mark.parametrize("lengths", [[5, 33, 16], [2, 9, 17, 31, 40]])
def test_padding_rows_do_not_join_the_mlp_union(model, lengths):
    """A batch-wide MLP top-k (a quarter of the neurons) on a padded bucket: the padding rows must not
    pull neurons into the union, so the live rows' logits equal the unpadded eager step's."""
    runner = _runner(model, static=False)
    planner = _random_planner(model, None, model.cfg.intermediate_size // 4)
    runner.planner_factory = lambda batch_size: planner
    seqs = _prefilled(runner, lengths)
    want = _decode(runner, seqs)
    runner.use_static_decode()
    got = _decode(runner, seqs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_rows_touch_only_the_null_block(model):
    runner = _runner(model, static=True)
    seqs = _prefilled(runner, [6, 20, 11])
    before = [(k.clone(), v.clone()) for k, v in runner.cache.layers]
    _decode(runner, seqs)  # bucket 4: one padding row
    written = {s.block_table[(s.num_tokens - 1) // BLOCK] for s in seqs}
    for (k0, v0), (k1, v1) in zip(before, runner.cache.layers):
        changed = ((k0 != k1).flatten(1).any(1) | (v0 != v1).flatten(1).any(1)).nonzero().flatten().tolist()
        assert set(changed) <= written | {NULL_BLOCK}
        assert NULL_BLOCK in changed


def test_greedy_generation_static_equals_eager(model):
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 18, 9)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = {}
    for static in (False, True):
        engine = LLMEngine(model, engine_config=EngineConfig(block_size=BLOCK, num_kv_blocks=64, max_num_seqs=8))
        if static:
            engine.runner.use_static_decode()
        for p in prompts:
            engine.add_request(p, params)
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        outs[static] = [done[k] for k in sorted(done)]
    assert outs[True] == outs[False]
    assert all(len(t) == 20 for t in outs[True])


def test_planner_factory_is_asked_per_bucket_and_reset(model):
    runner = _runner(model, static=True)
    asked = []
    planner = _random_planner(model, 1, None)
    runner.planner_factory = lambda b: asked.append(b) or planner
    seqs = _prefilled(runner, [4, 4, 4])
    _decode(runner, seqs)
    _decode(runner, seqs[:2])
    assert asked == [4, 2]
    runner.planner_factory = None  # back to dense: sparse steps are forgotten
    assert all(not k.sparse for k in runner.graphs._steps)
    _decode(runner, seqs)
    assert asked == [4, 2]


def test_width_for_is_a_power_of_two_within_limits():
    assert width_for(1, 16, 512) == 32  # at least MIN_WIDTH_TOKENS of blocks
    assert width_for(33, 16, 512) == 64
    assert width_for(64, 16, 512) == 64
    assert width_for(600, 16, 512) == 512
