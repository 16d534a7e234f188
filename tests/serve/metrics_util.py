"""Read the server's Prometheus metrics in tests."""
from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(url: str, name: str, **labels) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    """Wait until nothing runs or waits and the KV cache is empty; return the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        idle = (m[("polarsparse_num_requests_running", ())] == 0 and m[("polarsparse_num_requests_waiting", ())] == 0
                and m[("polarsparse_kv_cache_usage", ())] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
