"""The sparsity in use follows the live batch size: each decode step uses its bucket's top-k row,
and /metrics reports the density actually read."""
from __future__ import annotations

import asyncio

import httpx
import torch
from torch import nn

from polarsparse.serve.async_engine import StepReport
from polarsparse.serve.metrics import ServingMetrics
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner, bucket_for
from polarsparse.sparsity.routers import HeadRouter, LayerRouters, MLPRouter
from tests.serve.conftest import serving, tiny_engine
from tests.serve.metrics_util import wait_idle

MLP_K = {1: 32, 2: 64, 4: 96, 8: 128}  # bucket -> neurons kept (of 128), like a calibrated table


class TableFactory:
    """A PlannerFactory over a per-bucket MLP top-k table (heads: 1 of 2 KV groups after layer 0)."""

    def __init__(self, engine):
        cfg = engine.cfg
        torch.manual_seed(0)
        self.routers = nn.ModuleList(
            LayerRouters(HeadRouter(cfg.hidden_size, cfg.num_kv_heads) if i else None,
                         MLPRouter(cfg.hidden_size, 16, cfg.intermediate_size))
            for i in range(cfg.num_layers))
        self.calls: list[int] = []

    def __call__(self, batch_size: int) -> RouterPlanner:
        self.calls.append(batch_size)
        k = MLP_K[bucket_for(batch_size, tuple(MLP_K))]
        budgets = [LayerBudget(1 if i else None, k) for i in range(len(self.routers))]
        return RouterPlanner(self.routers, budgets)


def test_metrics_report_the_row_of_each_steps_bucket(tiny_folder):
    engine = tiny_engine(tiny_folder)
    engine.runner.planner_factory = TableFactory(engine)
    metrics = ServingMetrics(engine)
    gauge = metrics.registry.get_sample_value
    for batch, k in ((1, 32), (2, 64), (3, 96), (8, 128)):
        metrics.on_step(StepReport(True, batch, batch, batch, 0.01))
        assert gauge("polarsparse_sparsity_mlp_density") == k / 128
        assert gauge("polarsparse_sparsity_head_density") == (1.0 + 0.5) / 2  # layer 0 dense, layer 1 one of two
    metrics.on_step(StepReport(False, 5, 40, 5, 0.01))  # prefill is dense and leaves the gauges alone
    assert gauge("polarsparse_sparsity_mlp_density") == 1.0


def test_a_sparse_server_follows_the_batch_size(tiny_folder):
    engine = tiny_engine(tiny_folder)
    factory = engine.runner.planner_factory = TableFactory(engine)
    decode_batches, execute = [], engine.runner.execute

    def recording_execute(batch):
        if batch.is_decode:
            decode_batches.append(len(batch.seqs))
        return execute(batch)

    engine.runner.execute = recording_execute

    async def burst(url, n):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            rs = await asyncio.gather(*(c.post("/v1/completions", json={**body, "prompt": [7 + i] * 5}) for i in range(n)))
            return [r.json()["usage"]["completion_tokens"] for r in rs]

    with serving(engine) as server:
        assert asyncio.run(burst(server.url, 1)) == [6]
        assert asyncio.run(burst(server.url, 8)) == [6] * 8
        m = wait_idle(server.url)
        steps = m[("polarsparse_decode_mlp_density_count", ())]
        mean = m[("polarsparse_decode_mlp_density_sum", ())] / steps
    assert 1 in decode_batches and max(decode_batches) > 4
    assert set(decode_batches) <= set(factory.calls)  # every live batch size asked for its planner
    expected = sum(MLP_K[bucket_for(b, tuple(MLP_K))] / 128 for b in decode_batches) / len(decode_batches)
    assert abs(mean - expected) < 1e-6 and 0.25 < mean < 1.0
