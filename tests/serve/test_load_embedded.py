"""Load test on the embedded model: 64 concurrent streaming clients through the openai client.

Every request must come back complete and token-for-token equal to offline generation of the same
prompt and seed; afterwards the server is healthy and the KV cache is empty.
"""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from polarsparse import LLM, SamplingParams
from polarsparse.serve.server import ServerThread, make_app
from tests.serve.metrics_util import scrape, value, wait_idle

CLIENTS, DISTINCT, MAX_TOKENS = 64, 16, 8
TOPICS = ["the sea", "a robot", "winter", "bread", "music", "a city", "rain", "mountains",
          "a library", "coffee", "trains", "the moon", "gardens", "chess", "birds", "a river"]


def request_of(i: int) -> tuple[str, dict]:
    """Client i: one of DISTINCT prompts; odd clients sample with a seed, even ones are greedy."""
    prompt = f"Write one sentence about {TOPICS[i % DISTINCT]}."
    params = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8, top_p=0.95, seed=100 + i % DISTINCT)
    return prompt, params


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", max_num_seqs=CLIENTS, kv_cache_memory=0.5)


def offline_reference(llm) -> dict[tuple, list[int]]:
    keys = sorted({(request_of(i)[0], tuple(sorted(request_of(i)[1].items()))) for i in range(CLIENTS)})
    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **dict(k[1])) for k in keys]
    outs = llm.generate([k[0] for k in keys], params)
    return {k: o.outputs[0].token_ids for k, o in zip(keys, outs)}


async def one_client(client: openai.AsyncOpenAI, i: int) -> tuple[list[int], str, str]:
    prompt, params = request_of(i)
    stream = await client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True}, **params)
    tokens, text, finish = [], "", None
    async for chunk in stream:
        c = chunk.choices[0]
        tokens += c.model_extra["token_ids"]
        text += c.text
        finish = c.finish_reason or finish
    return tokens, text, finish


@pytest.mark.slow
def test_64_concurrent_streams_match_offline_generation(llm):
    ref = offline_reference(llm)
    app = make_app(llm.engine, ["SmolLM2-135M-Instruct"], "dense")

    async def main(url):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=CLIENTS))) as c:
            return await asyncio.wait_for(asyncio.gather(*(one_client(c, i) for i in range(CLIENTS))), 240)

    with ServerThread(app) as server:
        results = asyncio.run(main(server.url))
        for i, (tokens, text, finish) in enumerate(results):
            prompt, params = request_of(i)
            assert tokens == ref[(prompt, tuple(sorted(params.items())))], f"client {i} differs from offline"
            assert finish == "length" and text
        m = wait_idle(server.url)
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert m[("polarsparse_kv_cache_usage", ())] == 0
        assert value(server.url, "polarsparse_requests_total", endpoint="completions", outcome="length") == CLIENTS
        assert value(server.url, "polarsparse_generation_tokens_total") == CLIENTS * MAX_TOKENS
        batch = scrape(server.url)
        assert batch[("polarsparse_decode_batch_size_sum", ())] / batch[("polarsparse_decode_batch_size_count", ())] > 8
