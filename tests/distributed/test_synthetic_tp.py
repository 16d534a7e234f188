"""Random-weight ``synthetic:`` models under tensor parallelism.

The synthetic checkpoint gives every rank its shard of one random model, so TP=N must reproduce TP=1:
shard for shard (exact slices), greedy token for greedy token (dense, and sparse with a random router
bundle against TP=1 with selection_shards=N), on CPU with gloo and, where the device has several
GPUs, with NCCL on a real shape (those tests skip elsewhere).
"""
from __future__ import annotations

import json

import pytest
import torch

from polarsparse import LLM, SamplingParams, cli
from polarsparse.config import SparsityConfig
from polarsparse.distributed.state import TensorParallel
from polarsparse.errors import PolarsparseError
from polarsparse.models.loader import load_model, resolve_model_path
from polarsparse.models.synthetic import SyntheticSpec
from polarsparse.sparsity.random_bundle import save_random_bundle

TINY = "synthetic:tiny-llama"
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 17, 42, 9], [100, 3, 250, 7, 7, 31, 64, 12, 99], [8] * 20]
CPU = dict(device="cpu", dtype="float32", num_kv_blocks=32, block_size=16)


def _tokens(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_spec_parses_validates_and_round_trips():
    spec = SyntheticSpec.parse("synthetic:llama-2-13b:layers=4:seed=3")
    assert (spec.name, spec.layers, spec.seed) == ("llama-2-13b", 4, 3)
    assert str(spec) == "synthetic:llama-2-13b:layers=4:seed=3" and spec.config().num_layers == 4
    for bad, match in [("synthetic:gpt-9", "unknown model config"), ("synthetic:opt-6.7b:layers=99", "cannot keep 99"),
                       ("synthetic:opt-6.7b:depth=2", "bad option")]:
        with pytest.raises(PolarsparseError, match=match):
            resolve_model_path(bad)


def _unshard(name: str, parts: list[torch.Tensor], cfg) -> torch.Tensor:
    """The TP=1 parameter rebuilt from its rank shards (the inverse of the loader's split + fuse)."""
    if name.endswith("o_proj.weight"):
        return torch.cat(parts, 1)
    if name.endswith(("qkv.weight", "qkv.bias")):
        sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    elif name.endswith("mlp.w1") and cfg.activation == "silu_gated":
        sizes = [cfg.intermediate_size] * 2  # gate, up
    else:
        return torch.cat(parts, 0)
    pieces = [p.split([s // len(parts) for s in sizes]) for p in parts]
    return torch.cat([torch.cat([pc[j] for pc in pieces]) for j in range(len(sizes))])


@pytest.mark.parametrize("spec", ["synthetic:tiny-llama", "synthetic:tiny-opt:seed=5"])
def test_rank_shards_are_exact_slices_of_the_single_rank_model(spec):
    path = resolve_model_path(spec)
    cfg = SyntheticSpec.parse(spec).config()
    full = dict(load_model(path, torch.float32, torch.device("cpu")).named_parameters())
    ranks = [dict(load_model(path, torch.float32, torch.device("cpu"), TensorParallel(r, 2)).named_parameters())
             for r in range(2)]
    assert 0.015 < full["layers.0.mlp.w1"].std().item() < 0.025 and full["layers.0.norm1.weight"].eq(1).all()
    assert not torch.equal(full["layers.0.mlp.w1"], full["layers.1.mlp.w1"])  # a seed per tensor
    sharded = 0
    for name, whole in full.items():
        parts = [r[name] for r in ranks]
        if parts[0].shape == whole.shape:  # replicated
            assert all(torch.equal(p, whole) for p in parts), name
            continue
        sharded += 1
        assert torch.equal(_unshard(name, parts, cfg)[: whole.shape[0]], whole), name
    assert sharded >= 4 * cfg.num_layers


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    cfg = SyntheticSpec.parse(TINY).config()
    return save_random_bundle(cfg, tmp_path_factory.mktemp("routers"), rank=16, mlp_density=0.25, k_multiple=16)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_tp2_greedy_tokens_equal_tp1(sparse, tiny_bundle):
    """Sparse: a random bundle (heads 50%, MLP 25%); TP=1 selects per shard (selection_shards=2)."""
    kw = dict(routers=str(tiny_bundle), sparsity=SparsityConfig(mlp=True)) if sparse else {}
    one_kw = dict(kw, sparsity=SparsityConfig(mlp=True, selection_shards=2)) if sparse else kw
    one = LLM(TINY, **CPU, **one_kw)
    want, want_logits = _tokens(one), one.prompt_logits(PROMPTS)
    with LLM(TINY, **CPU, tensor_parallel_size=2, **kw) as many:
        assert many.engine.runner.cache.layers[0][0].shape[1] == 1  # 2 KV heads over 2 ranks
        assert _tokens(many) == want
        for a, b in zip(many.prompt_logits(PROMPTS), want_logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if sparse:
        assert _tokens(LLM(TINY, **CPU)) != want, "sparse should differ from dense somewhere (else it tests nothing)"


def test_bench_decode_tensor_parallel_sizes_on_cpu(tmp_path):
    """The TP path end to end (gloo, one spawned worker): rows, scaling table and goals per size."""
    argv = ["bench", "decode", "--model-config", "tiny-opt", "--batch", "1,2", "--context", "40",
            "--head-density", "0.5", "--mlp-density", "0.5", "--steps", "2", "--hf-batch", "", "--device", "cpu",
            "--dtype", "float32", "--tensor-parallel-size", "1,2", "--out-dir", str(tmp_path), "--tag", "t",
            "--no-progress"]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    got = {(r["tp"], r["batch"], r["mode"]) for r in result["rows"]}
    assert got == {(tp, b, m) for tp in (1, 2) for b in (1, 2) for m in ("dense", "sparse-h50+mlp50")}
    assert [run["size"] for run in result["meta"]["tensor_parallel"]] == [1, 2]
    assert result["meta"]["tensor_parallel"][1]["backend"] == "gloo"
    row = {(r["tp"], r["batch"], r["mode"]): r for r in result["rows"]}
    for b in (1, 2):  # each rank keeps half of its 2 heads (layer 0 dense) and 256 of its 512 neurons
        one, two = row[1, b, "sparse-h50+mlp50"], row[2, b, "sparse-h50+mlp50"]
        assert (two["head_density"], two["mlp_density"]) == (0.75, 0.5) == (one["head_density"], one["mlp_density"])
        assert two["bytes"] < 0.6 * one["bytes"] and row[2, b, "dense"]["bytes"] < 0.6 * row[1, b, "dense"]["bytes"]
    assert {g["goal"].split(":")[0] for g in result["goals"]} >= {"TP=2"}
    md = (tmp_path / "t.md").read_text()
    assert "## Tensor parallelism" in md and "| 2 | 2 | 40 | dense |" in md
    assert (tmp_path / "t.png").stat().st_size > 0


def test_bench_decode_rejects_sizes_that_do_not_split_the_model(tmp_path):
    argv = ["bench", "decode", "--model-config", "tiny-llama", "--batch", "1", "--context", "40", "--device", "cpu",
            "--tensor-parallel-size", "3", "--out-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2


GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
REAL_SHAPE = "synthetic:llama-2-13b:layers=2"


@pytest.mark.skipif(GPUS < 2, reason="needs 2+ GPUs (NCCL)")
def test_gpu_real_shape_tp_matches_tp1():
    """LLaMA-2-13B shape (2 layers), fp32, CUDA graphs with NCCL all-reduces captured inside:
    greedy tokens equal and prompt logits close to TP=1 (sums over ranks reorder fp32 additions).
    Runs the largest size the machine allows (4 of 4 GPUs, else 2), to keep the device call short."""
    size = 4 if GPUS >= 4 else 2
    prompts = [[5, 17, 42, 9, 300, 1000], [100, 3, 250, 7, 7, 31, 64, 12, 99], [8] * 40]
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=64, block_size=32, max_num_seqs=8)
    one = LLM(REAL_SHAPE, **kw)
    want, want_logits = _tokens(one, prompts), one.prompt_logits(prompts)
    one.close()
    with LLM(REAL_SHAPE, tensor_parallel_size=size, **kw) as many:
        assert _tokens(many, prompts) == want
        assert many.engine.runner.graphs.num_captured > 0  # decode ran on the static (graph) path
        for a, b in zip(many.prompt_logits(prompts), want_logits):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
