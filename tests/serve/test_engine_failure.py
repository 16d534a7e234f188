"""A bug inside an engine step fails in-flight requests with a clear error and marks the server
unhealthy, instead of hanging clients."""
from __future__ import annotations

import httpx

from tests.serve.conftest import serving, tiny_engine

REQ = {"model": "tiny", "prompt": "Hello", "max_tokens": 50, "ignore_eos": True}


def test_engine_crash_fails_requests_and_health(tiny_folder):
    engine = tiny_engine(tiny_folder)
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    engine.step = flaky_step
    with serving(engine) as server:
        r = httpx.post(f"{server.url}/v1/completions", json=REQ, timeout=30)
        assert r.status_code == 503 and "simulated kernel failure" in r.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").status_code == 503
        again = httpx.post(f"{server.url}/v1/completions", json={**REQ, "stream": True}, timeout=30)
        assert again.status_code == 503 and again.json()["error"]["type"] == "service_unavailable"
