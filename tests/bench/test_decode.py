"""Decode benchmark pieces on CPU: top-k tables, cost model, byte roofline, synthetic models, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from polarsparse import cli
from polarsparse.bench.decode_hf import build_hf_model
from polarsparse.bench.decode_roofline import step_bytes
from polarsparse.bench.decode_sparsity import (CostModel, SparsitySpec, load_mlp_table, plan_budgets,
                                               requested_budgets, table_row)
from polarsparse.config import ConfigError
from polarsparse.models.loader import build_model
from polarsparse.models.synthetic import random_model, synthetic_config
from polarsparse.sparsity.planner import LayerBudget

OPT = synthetic_config("opt-6.7b")
LLAMA3 = synthetic_config("llama-3-8b")


def _meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("name,billions", [("opt-6.7b", 6.66), ("llama-3-8b", 8.03), ("llama-2-7b", 6.74),
                                           ("mistral-7b", 7.24), ("opt-13b", 12.85)])
def test_synthetic_configs_have_the_published_sizes(name, billions):
    n = sum(p.numel() for p in _meta_model(synthetic_config(name)).parameters())
    assert abs(n / 1e9 - billions) < 0.02


def test_synthetic_config_subsets_and_errors():
    cfg = synthetic_config("llama-3-8b", num_layers=4, max_position_embeddings=20000)
    assert (cfg.num_layers, cfg.max_position_embeddings, cfg.num_kv_heads) == (4, 20000, 8)
    with pytest.raises(ConfigError, match="unknown model config"):
        synthetic_config("gpt-5")
    with pytest.raises(ConfigError, match="cannot keep 40"):
        synthetic_config("opt-6.7b", num_layers=40)


def test_random_model_is_finite_and_reproducible():
    cfg = synthetic_config("tiny-llama")
    a, b = (random_model(cfg, torch.float32, "cpu", seed=1) for _ in range(2))
    torch.testing.assert_close(a.lm_head_weight(), b.lm_head_weight())
    w = a.layers[0].mlp.w1
    assert w.dtype == torch.float32 and 0.015 < w.std().item() < 0.025
    assert a.layers[0].norm1.weight.eq(1).all()
    assert a.layers[0].attn.rope.cos.dtype == torch.float32


def test_shipped_mlp_table():
    table = load_mlp_table()
    assert sorted(table) == [1, 2, 4, 8, 16, 32, 48, 64, 128, 256]
    assert all(len(row) == 32 and all(0 < k <= 16384 and k % 128 == 0 for k in row) for row in table.values())
    assert sum(table[1]) / 32 / 16384 < sum(table[256]) / 32 / 16384  # density grows with batch
    assert table_row(table, 8) is table[8] and table_row(table, 512) is table[256]


def test_requested_budgets_keep_layer0_attention_dense():
    spec = SparsitySpec("s", head_density=0.3, mlp_table=load_mlp_table())
    budgets = requested_budgets(OPT, spec, 8)
    assert budgets[0].head_k is None and all(b.head_k == 10 for b in budgets[1:])  # ceil(0.3 * 32)
    assert [b.mlp_k for b in budgets] == load_mlp_table()[8]
    heads = [requested_budgets(LLAMA3, SparsitySpec("s", head_density=d), 1)[1].head_k for d in (0.3, 0.5, 0.01)]
    assert heads == [3, 4, 1]  # ceil(density * 8), at least one KV group
    mlp = requested_budgets(LLAMA3, SparsitySpec("s", mlp_density=0.3), 1)
    assert {b.mlp_k for b in mlp} == {4352}  # ceil(0.3 * 14336) rounded up to 128


def test_cost_model_keeps_dense_where_sparsity_does_not_pay():
    cost = CostModel(head_overhead_s=30e-6, mlp_overhead_s=10e-6)
    assert cost.head_pays(LLAMA3, batch=32, context=4096, k=4, elem=2)  # 67 MB of KV saved per layer
    assert not cost.head_pays(LLAMA3, batch=1, context=1024, k=4, elem=2)  # 2 MB saved < routing cost
    assert not cost.head_pays(LLAMA3, batch=256, context=4096, k=8, elem=2)  # all groups
    assert cost.mlp_pays(OPT, batch=1, k=1536, elem=2)
    assert not cost.mlp_pays(OPT, batch=256, k=16000, elem=2)  # past the kernels' break-even
    assert not CostModel(mlp_overhead_s=100e-6).mlp_pays(OPT, batch=1, k=1536, elem=2)  # routing > a dense MLP
    # measured MLP times replace the byte estimate: 4096 neurons took 40 of 89 us -> pays at 4096,
    # not at 8192 (80 us); a sparse MLP measured as slow as dense never pays
    timed = CostModel(mlp_overhead_s=10e-6, mlp_timing=(4096, 89e-6, 40e-6))
    assert timed.mlp_pays(OPT, batch=64, k=4096, elem=2) and not timed.mlp_pays(OPT, batch=64, k=8192, elem=2)
    assert not CostModel(mlp_overhead_s=1e-6, mlp_timing=(4096, 89e-6, 89e-6)).mlp_pays(OPT, 64, 4096, 2)
    spec = SparsitySpec("s", head_density=0.5, mlp_table=load_mlp_table())
    budgets = plan_budgets(OPT, spec, 256, 1024, cost)
    assert any(b.mlp_k is None for b in budgets) and any(b.mlp_k is not None for b in budgets)
    assert all(b.mlp_k is None or b.mlp_k < 16384 * 0.9 for b in budgets)
    assert all(b.head_k == 16 for b in budgets[1:]) and budgets[0].head_k is None


def test_step_bytes_dense_and_sparse():
    model = _meta_model(LLAMA3)
    params = sum(p.numel() * 2 for p in model.parameters())
    embed = model.embed_tokens.weight.numel() * 2
    kv_per_token = 2 * 32 * 8 * 128 * 2
    dense = step_bytes(model, 8, 4096)
    expected = params - embed + 8 * 4096 * kv_per_token
    assert abs(dense - expected) / expected < 0.01
    half_heads = [LayerBudget(None, None)] + [LayerBudget(4, None)] * 31
    sparse = step_bytes(model, 8, 4096, half_heads)
    saved = 8 * 4096 * kv_per_token * 31 / 32 / 2
    assert abs((dense - sparse) - saved) / saved < 0.01
    opt = _meta_model(OPT)
    mlp_half = [LayerBudget(None, 8192)] * 32
    assert step_bytes(opt, 1, 1024, mlp_half) < step_bytes(opt, 1, 1024) - 32 * 8192 * 4096 * 2 * 2 * 0.99


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_transformers_baseline_has_our_shape(name):
    cfg = synthetic_config(name)
    hf = build_hf_model(cfg, torch.float32, torch.device("cpu"))
    ours = random_model(cfg, torch.float32, "cpu")
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())


def test_bench_decode_cli_writes_results(tmp_path):
    argv = ["bench", "decode", "--model-config", "tiny-opt", "--batch", "1,2", "--context", "40,4000",
            "--head-density", "0.5", "--mlp-density", "0.25", "--steps", "2", "--hf-batch", "2",
            "--hf-context", "40", "--hf-steps", "2", "--device", "cpu", "--dtype", "float32",
            "--out-dir", str(tmp_path), "--tag", "t", "--no-progress"]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    modes = {(r["batch"], r["context"], r["mode"]) for r in result["rows"]}
    assert {(1, 40, "dense"), (2, 40, "dense"), (1, 40, "sparse-h50+mlp25"), (2, 40, "sparse-h50+mlp25")} <= modes
    assert any("longer than the model's context" in s["reason"] for s in result["skipped"])
    dense = next(r for r in result["rows"] if r["mode"] == "dense" and r["batch"] == 2)
    assert dense["step_ms"] > 0 and dense["tokens_per_s"] > 0 and dense["speedup_vs_dense"] == 1.0
    assert {g["goal"].split(" (")[0] for g in result["goals"]} >= {"sparse/dense speedup, slowest grid point"}
    assert (tmp_path / "t.md").read_text().startswith("# Decode benchmark: tiny-opt")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_profile_targets_put_asked_points_first():
    import argparse

    from polarsparse.bench.decode import Point, _points, _profile_targets

    rows = [{"batch": b, "context": c, "mode": m, "speedup_vs_dense": s} for b, c, m, s in [
        (1, 1024, "dense", 1.0), (1, 1024, "sparse-a", 1.1), (1, 1024, "sparse-b", 1.3),
        (64, 1024, "sparse-a", 1.9), (64, 1024, "sparse-b", 1.5), (8, 1024, "sparse-a", 1.6)]]
    args = argparse.Namespace(profile=1, profile_at=_points("1:1024,2:99"))
    assert _profile_targets(rows, args) == [(Point(1, 1024), "sparse-b"), (Point(64, 1024), "sparse-a")]
    with pytest.raises(argparse.ArgumentTypeError):
        _points("1x1024")
