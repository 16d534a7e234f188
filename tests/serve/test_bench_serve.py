"""The serving benchmark: its metric definitions, and one small load against a tiny server."""
from __future__ import annotations

import json
import math

import pytest

from polarsparse.bench import serve as bench
from polarsparse.cli import build_parser, main
from tests.serve.conftest import serving, tiny_engine


def test_summary_follows_the_definitions():
    # request 1: sent at 0, tokens at 0.5, 0.6, 0.8 -> TTFT 0.5, E2E 0.8, TPOT 0.15, ITL 0.1, 0.2
    r1 = bench.RequestResult(True, 10, output_tokens=3, ttft=0.5, e2e=0.8, itl=[0.1, 0.2])
    r2 = bench.RequestResult(True, 20, output_tokens=1, ttft=0.3, e2e=0.3)
    failed = bench.RequestResult(False, 5, error="HTTP 400")
    s = bench.summarize([r1, r2, failed], wall=2.0)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 400"]
    assert s["output_throughput"] == pytest.approx(4 / 2.0)
    assert s["total_token_throughput"] == pytest.approx((4 + 30) / 2.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(400) and s["e2e_ms"]["median"] == pytest.approx(550)
    assert s["tpot_ms"]["mean"] == pytest.approx(150)  # only requests with > 1 token have a TPOT
    assert s["itl_ms"]["mean"] == pytest.approx(150) and s["itl_ms"]["p99"] == pytest.approx(199, abs=1)


def test_server_view_is_the_change_over_a_run():
    before = {"decode_steps": 10, "decode_batch_sum": 40, "mlp_density_sum": 10, "head_density_sum": 10, "preemptions": 1}
    after = {"decode_steps": 14, "decode_batch_sum": 72, "mlp_density_sum": 12, "head_density_sum": 13, "preemptions": 3}
    v = bench.server_view(before, after)
    assert v == {"decode_steps": 4, "mean_decode_batch": 8.0, "mean_mlp_density": 0.5, "mean_head_density": 0.75,
                 "preemptions": 2}


def bench_args(*argv: str):
    return build_parser(["bench", "serve"]).parse_args(["bench", "serve", *argv])


def test_mode_selection_and_clear_errors(tiny_folder):
    with pytest.raises(bench.BenchError, match="--routers"):  # a model with no shipped bundle
        bench.parse_modes(bench_args("--model", str(tiny_folder), "--modes", "dense,sparse"))
    with pytest.raises(bench.BenchError, match="dense and/or sparse"):
        bench.parse_modes(bench_args("--modes", "fast"))
    modes = bench.parse_modes(bench_args("--model", str(tiny_folder), "--random-routers"))
    assert [(m.name, m.sparse) for m in modes] == [("dense", False), ("sparse", True)]
    assert [m.name for m in bench.parse_modes(bench_args("--base-url", "http://127.0.0.1:1"))] == ["external"]


def test_load_against_a_tiny_server(tiny_folder):
    prompts = [[100 + i] * 12 for i in range(6)]
    with serving(tiny_engine(tiny_folder)) as server:
        results, wall = bench.run_load(server.url, "tiny", prompts, [5] * 6, rate=50.0, max_concurrency=3, seed=0)
        view = bench.server_view({}, bench._server_counters(server.url))
    assert all(r.ok and r.output_tokens == 5 and len(r.itl) <= 4 for r in results)
    assert all(0 < r.ttft <= r.e2e <= wall for r in results)
    s = bench.summarize(results, wall)
    assert s["completed"] == 6 and s["output_tokens"] == 30
    assert 1 <= view["mean_decode_batch"] <= 3  # the concurrency cap held
    assert view["mean_mlp_density"] == 1.0  # dense


@pytest.mark.slow
def test_cli_writes_json_and_markdown(tiny_folder, tmp_path):
    rc = main(["bench", "serve", "--model", str(tiny_folder), "--dtype", "float32", "--device", "cpu", "--modes", "dense",
               "--request-rates", "20,inf", "--num-prompts", "4", "--input-len", "8", "--output-len", "3",
               "--warmup", "1", "--num-kv-blocks", "32", "--block-size", "16", "--out-dir", str(tmp_path), "--tag", "t"])
    assert rc == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert [r["request_rate"] for r in data["runs"]] == [20.0, "inf"]
    assert all(r["completed"] == 4 and r["output_tokens"] == 12 for r in data["runs"])
    assert data["meta"]["sparsity"]["dense"].startswith("dense")
    assert "| dense | inf | 4/4 |" in (tmp_path / "t.md").read_text()
    assert math.isfinite(data["runs"][1]["ttft_ms"]["p99"])
