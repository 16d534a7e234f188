"""More concurrent long requests than KV blocks: preemption, then every request completes intact."""
from __future__ import annotations

import asyncio
import json

import httpx

from polarsparse.engine.sampling import SamplingParams
from tests.helpers import random_prompts
from tests.serve.conftest import TINY_VOCAB, serving, tiny_engine
from tests.serve.metrics_util import value, wait_idle

N, PROMPT_LEN, MAX_TOKENS = 8, 40, 40  # 80 tokens = 5 blocks each, 40 blocks in all


def offline(engine, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, str(i))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(prompts))]


async def stream_tokens(client: httpx.AsyncClient, prompt: list[int]) -> tuple[list[int], str]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    tokens, finish = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                finish = choice["finish_reason"] or finish
    return tokens, finish


def test_exhausted_cache_preempts_and_loses_nothing(tiny_folder):
    prompts = random_prompts(TINY_VOCAB, [PROMPT_LEN] * N, seed=5)
    ref = offline(tiny_engine(tiny_folder), prompts)
    small = tiny_engine(tiny_folder, num_kv_blocks=13)  # 12 usable blocks: room for 2 requests at a time

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(stream_tokens(client, p) for p in prompts))

    with serving(small) as server:
        results = asyncio.run(main(server.url))
        assert [t for t, _ in results] == ref
        assert all(f == "length" for _, f in results)
        assert value(server.url, "polarsparse_preemptions_total") > 0
        assert value(server.url, "polarsparse_requests_total", endpoint="completions", outcome="length") == N
        assert wait_idle(server.url)[("polarsparse_kv_cache_usage", ())] == 0
        assert httpx.get(f"{server.url}/health").status_code == 200
