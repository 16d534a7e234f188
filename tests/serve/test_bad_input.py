"""Every bad request gets a 4xx JSON error in OpenAI's shape, and the server keeps serving."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.serve.metrics_util import value, wait_idle

KEY = {"Authorization": "Bearer test-key"}
OK = {"model": "tiny", "prompt": "Hello there", "max_tokens": 2}
CHAT_OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def body(**changes) -> bytes:
    return json.dumps({**OK, **changes}).encode()


def chat_body(**changes) -> bytes:
    return json.dumps({**CHAT_OK, **changes}).encode()


CASES = [  # (id, path, raw body, headers, status, param)
    ("malformed-json", "completions", b'{"model": "tiny", "prompt": ', KEY, 400, None),
    ("not-an-object", "completions", b"[1, 2]", KEY, 400, None),
    ("invalid-utf8", "completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', KEY, 400, None),
    ("prompt-wrong-type", "completions", body(prompt=5), KEY, 400, "prompt"),
    ("max-tokens-string", "completions", body(max_tokens="8"), KEY, 400, "max_tokens"),
    ("temperature-string", "completions", body(temperature="hot"), KEY, 400, "temperature"),
    ("stream-not-bool", "completions", body(stream="yes"), KEY, 400, "stream"),
    ("messages-wrong-type", "chat/completions", chat_body(messages="hi"), KEY, 400, "messages"),
    ("bad-role", "chat/completions", chat_body(messages=[{"role": "wizard", "content": "x"}]), KEY, 400, None),
    ("missing-model", "completions", json.dumps({"prompt": "x"}).encode(), KEY, 400, "model"),
    ("unknown-field", "completions", body(best_friend=1), KEY, 400, "best_friend"),
    ("unknown-model", "completions", body(model="gpt-9"), KEY, 404, "model"),
    ("unknown-model-chat", "chat/completions", chat_body(model="gpt-9"), KEY, 404, "model"),
    ("empty-prompt", "completions", body(prompt=""), KEY, 400, "prompt"),
    ("empty-token-prompt", "completions", body(prompt=[]), KEY, 400, "prompt"),
    ("empty-prompt-in-list", "completions", body(prompt=["a", ""]), KEY, 400, "prompt"),
    ("empty-messages", "chat/completions", chat_body(messages=[]), KEY, 400, "messages"),
    ("prompt-too-long", "completions", body(prompt=[5] * 2100), KEY, 400, "prompt"),
    ("text-prompt-too-long", "completions", body(prompt="word " * 2500), KEY, 400, "prompt"),
    ("max-tokens-over-context", "completions", body(max_tokens=3000), KEY, 400, "max_tokens"),
    ("max-tokens-zero", "completions", body(max_tokens=0), KEY, 400, "max_tokens"),
    ("negative-temperature", "completions", body(temperature=-0.5), KEY, 400, "temperature"),
    ("top-p-zero", "completions", body(top_p=0), KEY, 400, "top_p"),
    ("top-p-above-one", "completions", body(top_p=1.5), KEY, 400, "top_p"),
    ("huge-n", "completions", body(n=10**6), KEY, 400, "n"),
    ("huge-n-chat", "chat/completions", chat_body(n=1000), KEY, 400, "n"),
    ("token-out-of-vocab", "completions", body(prompt=[10**7]), KEY, 400, "prompt"),
    ("min-over-max", "completions", body(min_tokens=5, max_tokens=2), KEY, 400, "min_tokens"),
    ("empty-stop", "completions", body(stop=[""]), KEY, 400, "stop"),
    ("unsupported-logprobs", "completions", body(logprobs=3), KEY, 400, "logprobs"),
    ("unsupported-echo", "completions", body(echo=True), KEY, 400, "echo"),
    ("unsupported-penalty", "completions", body(presence_penalty=0.5), KEY, 400, "presence_penalty"),
    ("unsupported-tools", "chat/completions", chat_body(tools=[{"type": "function"}]), KEY, 400, "tools"),
    ("unsupported-json-mode", "chat/completions", chat_body(response_format={"type": "json_object"}), KEY, 400,
     "response_format"),
    ("stream-options-without-stream", "completions", body(stream_options={"include_usage": True}), KEY, 400,
     "stream_options"),
    ("no-api-key", "completions", body(), {}, 401, None),
    ("wrong-api-key", "completions", body(), {"Authorization": "Bearer nope"}, 401, None),
    ("wrong-api-key-models", "models", None, {"Authorization": "Bearer nope"}, 401, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(tiny_server, case):
    _, path, raw, headers, status, param = case
    url = f"{tiny_server.url}/v1/{path}"
    r = httpx.get(url, headers=headers) if raw is None else httpx.post(
        url, content=raw, headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_server_still_serves_after_the_battery(tiny_server):
    for _ in range(3):  # whatever order the battery ran in
        r = httpx.post(f"{tiny_server.url}/v1/completions", json=OK, headers=KEY, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{tiny_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{tiny_server.url}/nowhere").status_code == 404
    m = wait_idle(tiny_server.url)
    assert m[("polarsparse_kv_cache_usage", ())] == 0


def test_client_disconnecting_mid_stream_aborts_and_frees_blocks(tiny_server):
    url = tiny_server.url
    aborted = value(url, "polarsparse_requests_total", endpoint="completions", outcome="aborted")
    req = {**OK, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=req, headers=KEY, timeout=30) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                assert value(url, "polarsparse_kv_cache_usage") > 0  # still generating
                break  # leaving the iterator closes the connection
    m = wait_idle(url, timeout=10)
    assert m[("polarsparse_kv_cache_usage", ())] == 0 and m[("polarsparse_num_requests_running", ())] == 0
    assert value(url, "polarsparse_requests_total", endpoint="completions", outcome="aborted") == aborted + 1


def test_client_leaving_a_non_streaming_request_aborts_it(tiny_server):
    url = tiny_server.url
    aborted = value(url, "polarsparse_requests_total", endpoint="completions", outcome="aborted")
    req = {**OK, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=req, headers=KEY, timeout=httpx.Timeout(10, read=0.3))
    deadline = time.monotonic() + 10
    while value(url, "polarsparse_requests_total", endpoint="completions", outcome="aborted") == aborted:
        assert time.monotonic() < deadline, "the server did not notice the client leaving"
        time.sleep(0.05)
    assert wait_idle(url, timeout=10)[("polarsparse_kv_cache_usage", ())] == 0
