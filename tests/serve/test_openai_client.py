"""The official openai client works unchanged against the server (tiny model, loopback)."""
from __future__ import annotations

import asyncio

import openai
import pytest

from polarsparse.engine.sampling import SamplingParams
from tests.serve.conftest import tiny_engine
from tests.serve.metrics_util import wait_idle

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="test-key", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_folder):
    """Offline generation on a separate engine over the same weights."""
    engine = tiny_engine(tiny_folder)

    def generate(prompt, **params):
        engine.add_request(prompt, SamplingParams(**params), "ref")
        out = None
        while engine.has_unfinished():
            out = next((o for o in engine.step() if o.finished), out)
        return out

    return generate


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_matches_offline_generation(client, offline):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    ref = offline(PROMPT, max_tokens=6, temperature=0, ignore_eos=True).outputs[0]
    choice = got.choices[0]
    assert choice.text == ref.text and choice.model_extra["token_ids"] == ref.token_ids
    assert choice.finish_reason == "length"
    assert got.usage.completion_tokens == 6 and got.usage.prompt_tokens > 0


def test_seeded_sampling_and_n(client, offline):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=11, n=3,
                                    extra_body={"ignore_eos": True})
    ref = offline(PROMPT, max_tokens=5, temperature=1.0, seed=11, n=3, ignore_eos=True)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [c.text for c in ref.outputs]


def test_batched_prompts_give_prompt_major_choices(client, offline):
    prompts = [PROMPT, "Hello world"]
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0, n=2,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        ref = offline(p, max_tokens=4, temperature=0, ignore_eos=True).outputs[0].text
        assert got.choices[2 * i].text == got.choices[2 * i + 1].text == ref


def test_streaming_completion_equals_non_streaming(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_string_is_honoured(client):
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:][:2]
    if not stop.strip():
        pytest.skip("the greedy text has no printable middle to stop on")
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert got.finish_reason == "stop" and stop not in got.text and base.startswith(got.text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == got.text


def test_chat_streaming_and_non_streaming(client, offline, tiny_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    ids = tiny_server.app.state.server.aengine.engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert whole.choices[0].message.content == offline(list(ids), max_tokens=6, temperature=0).outputs[0].text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_errors_map_to_openai_exceptions(client, tiny_server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT)
    bad = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_async_client_concurrent_streams(tiny_server):
    async def one(client, i):
        stream = await client.completions.create(model="tiny", prompt=f"{PROMPT} {i}", max_tokens=5, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="test-key", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)
    assert wait_idle(tiny_server.url)[("polarsparse_kv_cache_usage", ())] == 0
