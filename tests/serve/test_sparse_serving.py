"""Serving with a trained router bundle (tiny model): sparse decode through the server gives the same
tokens as offline sparse generation, and /metrics reports the density of the bundle's row in use."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from polarsparse import LLM, SamplingParams
from polarsparse.config import EngineConfig
from polarsparse.serve.server import ServerThread, build_engine, make_app, sparsity_label
from tests.helpers import random_prompts
from tests.serve.metrics_util import scrape, wait_idle
from tests.sparsity.tiny import VOCAB, tiny_pipeline

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.getbasetemp())


def mean_densities(url: str) -> tuple[float, float]:
    """Mean (MLP, head) density over the decode steps so far, as /metrics reports them."""
    m = scrape(url)
    steps = m[("polarsparse_decode_mlp_density_count", ())]
    return m[("polarsparse_decode_mlp_density_sum", ())] / steps, m[("polarsparse_decode_head_density_sum", ())] / steps


def table_density(engine, batch_size: int) -> tuple[float, float]:
    """(MLP, head) density of the bundle's table row for this batch size, averaged over layers."""
    cfg, budgets = engine.cfg, engine.sparse_setup.factory.budgets(batch_size)
    mlp = [(b.mlp_k or cfg.intermediate_size) / cfg.intermediate_size for b in budgets]
    head = [(b.head_k or cfg.num_kv_heads) / cfg.num_kv_heads for b in budgets]
    return sum(mlp) / len(mlp), sum(head) / len(head)


def test_sparse_server_matches_offline_sparse_generation(bundle):
    prompts = random_prompts(VOCAB, [6] * 8, seed=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    offline = LLM(str(bundle["model"]), dtype="float32", device="cpu", routers=str(bundle["routers"]),
                  num_kv_blocks=64, block_size=16)
    ref = [o.outputs[0].token_ids for o in offline.generate(prompts, params)]
    engine = build_engine(str(bundle["model"]), "float32", "cpu", str(bundle["routers"]),
                          EngineConfig(num_kv_blocks=64, block_size=16))
    assert "sparse" in sparsity_label(engine)

    async def burst(url, ps):
        body = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={**body, "prompt": p}) for p in ps))
        return [r.json()["choices"][0]["token_ids"] for r in rs]

    with ServerThread(make_app(engine, ["tiny"], sparsity_label(engine))) as server:
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["sparsity"] == sparsity_label(engine)
        single = asyncio.run(burst(server.url, prompts[:1]))
        alone = mean_densities(server.url)  # every decode step so far ran at batch 1
        everyone = asyncio.run(burst(server.url, prompts))
        assert wait_idle(server.url)[("polarsparse_kv_cache_usage", ())] == 0
    assert single == ref[:1] and everyone == ref
    assert alone == pytest.approx(table_density(engine, 1))
    assert alone[1] < 1.0  # heads run sparse (layer 0 dense, half the KV groups elsewhere)
