"""Prometheus metrics for the server: requests, tokens, batch size, KV usage, step time, sparsity.

Event metrics (steps, requests) are recorded as they happen; engine state (queues, KV usage,
preemptions) is read at scrape time by a collector. Each server has its own registry, so several
servers (tests, benchmarks) can live in one process.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from polarsparse.engine.engine import LLMEngine
from polarsparse.serve.async_engine import StepReport

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class SparsityProbe:
    """Density (fraction of MLP neurons / attention head units read) a decode step of a given batch
    size uses, from the planner the runner would build for it; 1.0 when the engine runs dense."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cache: dict[int, tuple[float, float]] = {}

    def __call__(self, batch_size: int) -> tuple[float, float]:
        if batch_size not in self._cache:
            self._cache[batch_size] = self._measure(batch_size)
        return self._cache[batch_size]

    def _measure(self, batch_size: int) -> tuple[float, float]:
        factory = self.engine.runner.planner_factory
        planner = factory(batch_size) if factory is not None else None
        budgets = getattr(planner, "budgets", None)
        if not budgets:
            return 1.0, 1.0
        cfg = self.engine.cfg
        units = cfg.num_kv_heads if getattr(planner, "head_unit", "kv") == "kv" else cfg.num_heads
        mlp = [1.0 if b.mlp_k is None else b.mlp_k / cfg.intermediate_size for b in budgets]
        head = [1.0 if b.head_k is None else b.head_k / units for b in budgets]
        return sum(mlp) / len(mlp), sum(head) / len(head)


class ServingMetrics:
    def __init__(self, engine: LLMEngine):
        self.registry = r = CollectorRegistry()
        self.density = SparsityProbe(engine)
        self.requests = Counter("polarsparse_requests", "HTTP generation requests by endpoint and outcome "
                                "(stop, length, aborted, rejected, error)", ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("polarsparse_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("polarsparse_generation_tokens", "Tokens generated", registry=r)
        self.step_seconds = Histogram("polarsparse_step_seconds", "Time per engine step", ["kind"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Gauge("polarsparse_batch_size", "Sequences in the last engine step", registry=r)
        self.decode_batch = Histogram("polarsparse_decode_batch_size", "Sequences per decode step",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.mlp_density_now = Gauge("polarsparse_sparsity_mlp_density",
                                     "Mean fraction of MLP neurons read in the last decode step (1 = dense)", registry=r)
        self.head_density_now = Gauge("polarsparse_sparsity_head_density",
                                      "Mean fraction of attention head units read in the last decode step (1 = dense)", registry=r)
        self.mlp_density = Summary("polarsparse_decode_mlp_density", "MLP density per decode step", registry=r)
        self.head_density = Summary("polarsparse_decode_head_density", "Head density per decode step", registry=r)
        self.ttft = Histogram("polarsparse_time_to_first_token_seconds", "Request received -> first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("polarsparse_e2e_request_latency_seconds", "Request received -> last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.mlp_density_now.set(1.0)
        self.head_density_now.set(1.0)
        r.register(_EngineState(engine))

    # engine thread
    def on_step(self, step: StepReport) -> None:
        kind = "decode" if step.is_decode else "prefill"
        self.step_seconds.labels(kind).observe(step.seconds)
        self.batch_size.set(step.batch_size)
        self.generation_tokens.inc(step.generated)
        if step.is_decode:
            self.decode_batch.observe(step.batch_size)
            mlp, head = self.density(step.batch_size)
            self.mlp_density_now.set(mlp)
            self.head_density_now.set(head)
            self.mlp_density.observe(mlp)
            self.head_density.observe(head)

    # event loop
    def request_done(self, endpoint: str, outcome: str, prompt_tokens: int = 0,
                     ttft: float | None = None, e2e: float | None = None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if e2e is not None:
            self.e2e.observe(e2e)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineState:
    """Scrape-time view of the engine (plain reads; safe beside the engine thread)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def collect(self):
        sched, alloc = self.engine.scheduler, self.engine.runner.cache.allocator
        yield GaugeMetricFamily("polarsparse_num_requests_running", "Sequences in the running batch", len(sched.running))
        yield GaugeMetricFamily("polarsparse_num_requests_waiting", "Sequences waiting for prefill", len(sched.waiting))
        yield GaugeMetricFamily("polarsparse_kv_cache_usage", "Fraction of KV blocks in use (0-1)", alloc.usage)
        yield GaugeMetricFamily("polarsparse_kv_blocks_total", "Usable KV blocks", alloc.num_usable)
        yield CounterMetricFamily("polarsparse_preemptions", "Running sequences preempted for KV blocks (recomputed)",
                                  sched.counters.preemptions)
