"""``polarsparse bench decode``: decode latency and tokens/s at real shapes, dense vs sparse vs
transformers vs the byte roofline, for one model config per run.

    polarsparse bench decode --model-config opt-6.7b --batch 1,8,32,64 --context 1024
    polarsparse bench decode --model-config llama-3-8b --batch 1,8,32,64,128,256 \\
        --context 1024,4096,16384 --extend-positions
    polarsparse bench decode --model-config llama-2-13b --tensor-parallel-size 1,2,4 --batch 8,64


The model has random bf16 weights (speed depends on shapes and k, not on values) and the KV cache is
filled with random values instead of running prefill: every sequence starts a point with
``context`` tokens cached. Each point runs ``--steps`` real engine decode steps (static buffers,
CUDA graph replay, greedy sampling) per mode: dense, then one sparse mode per ``--head-density``
(+ the calibrated MLP table for OPT-6.7B, or ``--mlp-density``). Points that do not fit the GPU's
memory or the model's context are skipped and listed. Writes <tag>.json, <tag>.md, <tag>.png.

The model is the spec ``synthetic:<model-config>[:layers=N]`` loaded like a checkpoint, so with
``--tensor-parallel-size 1,2,4`` each size runs the same random model as that many ranks (one
process per GPU, see bench/decode_tp.py) and the report adds sparse/dense speedup per size and the
scaling efficiency step(TP=1) / (N * step(TP=N)).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import faulthandler
import math
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from polarsparse.bench import decode_report, roofline
from polarsparse.bench.decode_roofline import step_bytes
from polarsparse.bench.decode_sparsity import (CostModel, SparsitySpec, load_mlp_table, measure_overheads,
                                               plan_budgets, planner_factory, shard_config)
from polarsparse.bench.decode_tp import REPLAY_WARMUP, Ranks, prepare_rank, set_mode, start_ranks
from polarsparse.config import DTYPES, ConfigError, EngineConfig, ModelConfig
from polarsparse.distributed.state import TensorParallel
from polarsparse.engine.kv_cache import bytes_per_block
from polarsparse.engine.runner import ModelRunner
from polarsparse.engine.sampling import Sampler, SamplingParams
from polarsparse.engine.scheduler import ScheduledBatch
from polarsparse.engine.sequence import Sequence, Status
from polarsparse.models.loader import build_model
from polarsparse.models.synthetic import SYNTHETIC_CONFIGS, SyntheticSpec, synthetic_config
from polarsparse.sparsity.planner import LayerBudget, bucket_for

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # the first captures the step's graph


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _points(text: str) -> list["Point"]:
    """'1:1024,64:4096' -> [Point(1, 1024), Point(64, 4096)]."""
    try:
        return [Point(*(int(x) for x in v.split(":"))) for v in text.split(",") if v]
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"expected B:context[,B:context...], got {text!r}") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", required=True, choices=sorted(SYNTHETIC_CONFIGS), help="real shape to build with random weights")
    p.add_argument("--batch", type=_ints, default=[1, 8, 32, 64, 128, 256], help="batch sizes (comma list)")
    p.add_argument("--context", type=_ints, default=[1024, 4096, 16384], help="cached tokens per sequence (comma list)")
    p.add_argument("--head-density", type=_floats, default=[0.5, 0.3], help="sparse modes: KV groups kept per sequence")
    p.add_argument("--mlp-table", default="auto",
                   help="per-layer MLP top-k CSV (layer,batch_size,k); 'auto': the shipped OPT-6.7B table for opt-6.7b; 'none'")
    p.add_argument("--mlp-density", type=float, default=None, help="fixed MLP density for every layer instead of a table")
    p.add_argument("--router-rank", type=int, default=256, help="MLP router rank (its bytes count against sparse steps)")
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per point and mode")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quick runs)")
    p.add_argument("--tensor-parallel-size", type=_ints, default=[1],
                   help="tensor-parallel sizes to run, one after another (comma list, e.g. 1,2,4; one GPU per rank)")
    p.add_argument("--extend-positions", action="store_true",
                   help="allow contexts past the model's position table (speed only; recorded in the results)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke runs)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--reserve-gib", type=float, default=6.0, help="GPU memory kept free beside the KV cache")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs, no fused ops (EngineConfig.enforce_eager)")
    p.add_argument("--hf-batch", type=_ints, default=[1, 8, 32], help="transformers baseline batch sizes ('' = none)")
    p.add_argument("--hf-context", type=_ints, default=[1024], help="transformers baseline contexts")
    p.add_argument("--hf-compile-batch", type=_ints, default=[], help="batch sizes where transformers also tries torch.compile")
    p.add_argument("--hf-steps", type=int, default=8)
    p.add_argument("--profile", type=int, default=1, help="points to profile per op (best sparse speedup first)")
    p.add_argument("--profile-at", type=_points, default=[],
                   help="B:context points to profile as well (comma list; dense and their best sparse mode)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default=None, help="output file stem (default decode-<model>-<gpu>)")
    p.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Point:
    batch: int
    context: int

    @property
    def tokens(self) -> int:
        return self.batch * self.context


@dataclass
class Setup:
    name: str
    cfg: ModelConfig
    dtype: torch.dtype
    device: torch.device
    specs: list[SparsitySpec]
    points: list[Point]
    skipped: list[dict]
    extended_to: int | None
    model_spec: str = ""  # synthetic:<name>[:layers=N][:positions=P], what every rank loads
    tp_sizes: tuple[int, ...] = (1,)


def make_setup(args) -> Setup:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if min(args.context) <= WARMUP_STEPS + args.steps:
        raise ConfigError(f"every --context must exceed the {WARMUP_STEPS + args.steps} decode steps run per point")
    longest = max(args.context)
    base = synthetic_config(args.model_config, args.layers)
    extend = args.extend_positions and longest > base.max_model_len
    cfg = synthetic_config(args.model_config, args.layers, longest if extend else None)
    points, skipped = [], []
    for ctx in sorted(set(args.context)):
        for b in sorted(set(args.batch)):
            if ctx > cfg.max_model_len:
                skipped.append({"batch": b, "context": ctx, "reason": f"longer than the model's context ({cfg.max_model_len}); "
                                "--extend-positions measures it anyway"})
            else:
                points.append(Point(b, ctx))
    spec = str(SyntheticSpec(args.model_config, args.layers, longest if extend else None))
    return Setup(args.model_config, cfg, DTYPES[args.dtype], device, sparsity_specs(args, cfg), points, skipped,
                 longest if extend else None, spec, tensor_parallel_sizes(args.tensor_parallel_size, cfg, device))


def tensor_parallel_sizes(sizes: list[int], cfg: ModelConfig, device: torch.device) -> tuple[int, ...]:
    """The sizes to run, checked now (before any rank starts): the model splits evenly over each,
    and on CUDA each has a GPU per rank."""
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--tensor-parallel-size needs sizes >= 1, got {sizes}")
    gpus = torch.cuda.device_count() if device.type == "cuda" else None
    for n in sorted(set(sizes)):
        if gpus is not None and n > gpus:
            raise ConfigError(f"tensor-parallel size {n} needs {n} GPUs; {gpus} visible")
        with torch.device("meta"):
            build_model(cfg, TensorParallel(0, n))  # ConfigError if heads / neurons do not divide
    return tuple(sorted(set(sizes)))


def sparsity_specs(args, cfg: ModelConfig) -> list[SparsitySpec]:
    """One spec per head density; the MLP part from --mlp-density or the table."""
    table = None
    if args.mlp_density is None:
        if args.mlp_table == "auto":
            table = load_mlp_table() if args.model_config == "opt-6.7b" else None
        elif args.mlp_table != "none":
            table = load_mlp_table(args.mlp_table)
    mlp_label = "+mlp-table" if table else (f"+mlp{round(100 * args.mlp_density)}" if args.mlp_density else "")
    return [SparsitySpec(f"sparse-h{round(100 * h)}{mlp_label}", h, table, args.mlp_density, args.router_rank)
            for h in args.head_density]


def kv_blocks(setup: Setup, args, reserve_bytes: int, size: int = 1) -> tuple[int, list[Point]]:
    """Blocks for the largest point that fits beside one rank's shard of the model (measured before
    it loads: every rank has a GPU like rank 0's); the points that fit."""
    per_block = bytes_per_block(setup.cfg, args.block_size, setup.dtype, setup.cfg.num_kv_heads // size)
    def need(p: Point) -> int:
        return p.batch * math.ceil(p.context / args.block_size) + 1

    if setup.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(setup.device)
        budget = max(0, free - rank_weight_bytes(setup, size) - reserve_bytes) // per_block
    else:
        budget = max(need(p) for p in setup.points) if setup.points else 2
    fits = [p for p in setup.points if need(p) <= budget]
    for p in setup.points:
        if p not in fits:
            setup.skipped.append({"batch": p.batch, "context": p.context, "tp": size,
                                  "reason": f"KV cache needs {need(p) * per_block / 2**30:.1f} GiB, "
                                            f"{budget * per_block / 2**30:.1f} GiB free beside the model"})
    return max([need(p) for p in fits], default=2), fits


def rank_weight_bytes(setup: Setup, size: int) -> int:
    """Bytes of one rank's shard of the model in the benchmark's dtype."""
    with torch.device("meta"):
        model = build_model(setup.cfg, TensorParallel(0, size))
    elem = torch.empty((), dtype=setup.dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * elem


# --------------------------------------------------------------------------- timing
def _prefilled_seqs(runner: ModelRunner, point: Point, steps: int, seed: int) -> list[Sequence]:
    """Sequences whose prompts are 'cached' (the cache holds random K/V), sized so that the last of
    ``steps`` decode steps attends over exactly ``point.context`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    start = point.context - steps + 1
    seqs = []
    for i in range(point.batch):
        prompt = torch.randint(3, runner.cfg.vocab_size, (start,), generator=gen).tolist()
        seq = Sequence(f"bench-{i}", 0, prompt, SamplingParams(temperature=0, ignore_eos=True))
        seq.block_table = runner.cache.allocator.allocate(runner.cache.blocks_for(point.context))
        seq.num_computed, seq.status = start - 1, Status.RUNNING
        seqs.append(seq)
    return seqs


def _rewind(seqs: list[Sequence]) -> None:
    """Back to the prompt, so that the next mode decodes the same positions."""
    for s in seqs:
        del s.output_token_ids[:]
        s.num_computed = s.num_tokens - 1


def _engine_steps(runner: ModelRunner, sampler: Sampler, seqs: list[Sequence], n: int) -> list[float]:
    """Run n real decode steps (inputs, replay, greedy sample, host sync); wall seconds of each."""
    params, gens = [s.params for s in seqs], [None] * len(seqs)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = runner.execute(ScheduledBatch(seqs, True, [1] * len(seqs)))
        tokens = sampler(logits, params, gens).tolist()
        for seq, tok in zip(seqs, tokens):
            seq.output_token_ids.append(tok)
            seq.num_computed += 1
        times.append(time.perf_counter() - t0)
    return times


def _step_seconds(ranks: Ranks, reps: int) -> float:
    """Median time of replaying the last decode step alone (GPU events; wall clock on CPU), on rank
    0 while the other ranks replay it as often (REPLAY_WARMUP + reps calls everywhere)."""
    runner = ranks.local
    step = runner.graphs.last_step
    ranks.replay_on_workers(REPLAY_WARMUP + reps)
    if runner.device.type == "cuda":
        return roofline.time_cuda(step, reps=reps, warmup=REPLAY_WARMUP, flush_l2=False, graph=False)
    for _ in range(REPLAY_WARMUP):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Mode:
    label: str
    spec: SparsitySpec | None  # None: dense


class CostModels:
    """The CostModel of each (sparse mode, bucket): routing costs timed on the GPU on first use, on
    rank 0's routers and share of the model. Without a GPU (smoke runs) routing is free, so every
    requested part runs sparse, as in bench serve."""

    def __init__(self, cfg: ModelConfig, ranks: Ranks, bandwidth: float | None):
        self.cfg, self.ranks, self.bandwidth = cfg, ranks, bandwidth
        self._models: dict[tuple[str, int], CostModel] = {}

    def __call__(self, spec: SparsitySpec, bucket: int) -> CostModel:
        key = (spec.label, bucket)
        if key not in self._models:
            self._models[key] = (measure_overheads(self.cfg, spec, self.ranks.routers(spec.label), bucket,
                                                   self.bandwidth, self.ranks.size)
                                 if self.bandwidth else CostModel(head_overhead_s=0.0, mlp_overhead_s=0.0))
        return self._models[key]


def bench_point(ranks: Ranks, sampler: Sampler, point: Point, modes: list[Mode], args,
                bandwidth: float | None, costs: CostModels) -> list[dict]:
    """Every mode at one point (same sequences); rows for the results table."""
    runner, cfg = ranks.runner, ranks.local.cfg
    seqs = _prefilled_seqs(runner, point, WARMUP_STEPS + args.steps, seed=point.batch * 7919 + point.context)
    rows = []
    try:
        for mode in modes:
            budgets, cost = None, None
            if mode.spec is not None:
                cost = costs(mode.spec, bucket_for(point.batch))
                budgets = plan_budgets(cfg, mode.spec, bucket_for(point.batch), point.context, cost, shards=ranks.size)
            ranks.everywhere(set_mode, mode.spec, point.context, cost)
            _rewind(seqs)
            _engine_steps(runner, sampler, seqs, WARMUP_STEPS)
            e2e = statistics.median(_engine_steps(runner, sampler, seqs, args.steps))
            step = _step_seconds(ranks, args.steps)
            routers = ranks.routers(mode.label) if mode.spec is not None else None
            nbytes = step_bytes(ranks.local.model, point.batch, point.context, budgets, routers)
            row = _row(point, mode.label, step, e2e, nbytes, bandwidth, shard_config(cfg, ranks.size), budgets, cost)
            rows.append({"tp": ranks.size, **row})
    finally:
        ranks.everywhere(set_mode, None, 0, None)
        for s in seqs:
            runner.cache.allocator.free(s.block_table)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_dense = our dense step / the row's step, at the same (TP size, batch, context)."""
    def key(r: dict) -> tuple[int, int, int]:
        return r.get("tp", 1), r["batch"], r["context"]

    dense = {key(r): r["step_ms"] for r in rows if r["mode"] == "dense"}
    for r in rows:
        d = dense.get(key(r))
        r["speedup_vs_dense"] = d / r["step_ms"] if d and r["step_ms"] else None


def _row(point: Point, mode: str, step: float, e2e: float, nbytes: int, bandwidth: float | None,
         cfg: ModelConfig, budgets: list[LayerBudget] | None, cost: CostModel | None) -> dict:
    """cfg: the shape one rank holds (its budgets, bytes and roofline are per rank)."""
    roof = nbytes / bandwidth if bandwidth else None
    heads = mlp = None
    if budgets is not None:
        heads = statistics.mean((b.head_k or cfg.num_kv_heads) / cfg.num_kv_heads for b in budgets)
        mlp = statistics.mean((b.mlp_k or cfg.intermediate_size) / cfg.intermediate_size for b in budgets)
    return {
        "batch": point.batch, "context": point.context, "mode": mode, "step_ms": step * 1e3, "e2e_ms": e2e * 1e3,
        "tokens_per_s": point.batch / e2e, "bytes": nbytes, "roofline_ms": roof and roof * 1e3,
        "x_roofline": roof and step / roof, "head_density": heads, "mlp_density": mlp,
        "sparse_layers": None if budgets is None else sum(b.head_k is not None or b.mlp_k is not None for b in budgets),
        "routing_us": None if cost is None else {"head": cost.head_overhead_s * 1e6, "mlp": cost.mlp_overhead_s * 1e6},
        "mlp_timing_us": None if cost is None or cost.mlp_timing is None else
        [cost.mlp_timing[0], cost.mlp_timing[1] * 1e6, cost.mlp_timing[2] * 1e6],
    }


# --------------------------------------------------------------------------- baseline, profile
def transformers_baseline(setup: Setup, args, result: dict, write) -> None:
    """transformers' generate on its own copy of the shape: eager points, then compiled ones
    (results are written after each pass, so a long compile cannot lose the eager rows)."""
    passes = [(False, args.hf_batch), (True, args.hf_compile_batch if setup.device.type == "cuda" else [])]
    passes = [(c, [(b, ctx) for ctx in args.hf_context for b in batches if Point(b, ctx) in setup.points])
              for c, batches in passes]
    if not any(points for _, points in passes):
        return
    from polarsparse.bench.decode_hf import build_hf_model, run_baseline

    model = build_hf_model(setup.cfg, setup.dtype, setup.device)
    for compiled, points in passes:
        for r in run_baseline(model, points, args.hf_steps, compiled):
            mode = "transformers+compile" if compiled else "transformers"
            if not r.step_s:  # None (failed) or 0 (the longer generate was not slower: timing noise)
                reason = r.note if r.step_s is None else "per-step time not measurable (timing noise)"
                setup.skipped.append({"batch": r.batch, "context": r.context, "reason": f"{mode}: {reason}"})
                continue
            result["rows"].append({
                "batch": r.batch, "context": r.context, "mode": mode, "step_ms": r.step_s * 1e3,
                "e2e_ms": r.step_s * 1e3, "tokens_per_s": r.batch / r.step_s, "bytes": None, "roofline_ms": None,
                "x_roofline": None, "head_density": None, "mlp_density": None, "settings": r.settings})
            result["hf_notes"].append(f"{mode} B={r.batch} ctx={r.context}: {r.settings}" + (f" ({r.note})" if r.note else ""))
        if points:
            add_speedups(result["rows"])
            write(result)


def profile_rows(ranks: Ranks, sampler: Sampler, rows: list[dict], modes: list[Mode], args,
                 costs: CostModels) -> list[dict]:
    """Per-op breakdown, dense and best sparse mode, at the points with the best sparse speedups
    (one rank: the profiler times ops of this process only)."""
    from polarsparse.bench.decode_profile import profile_ops

    runner = ranks.local

    out = []
    for point, best_mode in _profile_targets(rows, args):
        for mode in (m for m in modes if m.label in ("dense", best_mode)):
            seqs = _prefilled_seqs(runner, point, 1, seed=1)
            try:
                factory = mode.spec and planner_factory(runner.cfg, mode.spec, ranks.routers(mode.label),
                                                        point.context, costs(mode.spec, bucket_for(point.batch)))
                runner.planner_factory = factory
                _engine_steps(runner, sampler, seqs, 1)
                step = _step_seconds(ranks, args.steps)
                bucket = bucket_for(point.batch)
                width = _width(runner, seqs)
                planner = factory(bucket) if factory else None
                fb = runner.graphs.inputs.forward_batch(bucket, width, planner)
                ops = profile_ops(runner.model, runner.cache.layers, fb, planner, step)
                out.append({"batch": point.batch, "context": point.context, "mode": mode.label,
                            "step_ms": step * 1e3, "ops": ops})
            finally:
                runner.planner_factory = None
                for s in seqs:
                    runner.cache.allocator.free(s.block_table)
    return out


def _profile_targets(rows: list[dict], args) -> list[tuple[Point, str]]:
    """(point, its fastest sparse mode): the --profile-at points, then the --profile points with
    the best sparse speedups."""
    best: dict[Point, str] = {}
    for r in sorted((r for r in rows if r["mode"].startswith("sparse")), key=lambda r: -(r["speedup_vs_dense"] or 0)):
        best.setdefault(Point(r["batch"], r["context"]), r["mode"])
    asked = [p for p in args.profile_at if p in best]
    ranked = [p for p in best if p not in asked][: args.profile]
    return [(p, best[p]) for p in asked + ranked]


def _width(runner: ModelRunner, seqs: list[Sequence]) -> int:
    from polarsparse.engine.cuda_graphs import width_for

    return width_for(max(len(s.block_table) for s in seqs), runner.cache.block_size, runner.graphs.max_width)


# --------------------------------------------------------------------------- run
def run(args) -> int:
    setup = make_setup(args)
    if setup.device.type == "cuda":
        torch.cuda.set_device(setup.device)
    bandwidth = roofline.measure_copy_bandwidth(setup.device) if setup.device.type == "cuda" else None
    kind = "decode" if setup.tp_sizes == (1,) else "decode-tp"
    tag = args.tag or f"{kind}-{setup.name}-{_short_device(setup.device)}"
    result = None
    for size in setup.tp_sizes:
        part = engine_results(setup, args, bandwidth, size)
        result = part if result is None else _merge(result, part)
        _write(result, args.out_dir, tag)  # after each size, so a later failure keeps what was measured
    if 1 in setup.tp_sizes:
        transformers_baseline(setup, args, result, lambda r: _write(r, args.out_dir, tag))
    print(decode_report.summary_table(result))
    return 0


def _merge(result: dict, part: dict) -> dict:
    """Rows of another tensor-parallel size added to the results so far."""
    result["rows"] += part["rows"]
    result["meta"]["tensor_parallel"] += part["meta"]["tensor_parallel"]
    result["profile"] += part["profile"]
    return result


def engine_results(setup: Setup, args, bandwidth: float | None, size: int = 1) -> dict:
    """Dense and sparse rows (+ per-op profiles at TP=1) of our engine at one tensor-parallel size;
    stops the ranks and frees the GPU memory they used."""
    modes = [Mode("dense", None)] + [Mode(s.label, s) for s in setup.specs]
    num_blocks, points = kv_blocks(setup, args, int(args.reserve_gib * 2**30), size)
    max_len = max([p.context for p in points], default=1)
    ecfg = EngineConfig(block_size=args.block_size, num_kv_blocks=num_blocks, max_num_seqs=max(args.batch),
                        max_model_len=max_len, enforce_eager=args.eager, tensor_parallel_size=size)
    t0 = time.perf_counter()
    ranks = start_ranks(setup.model_spec, setup.dtype, setup.device, ecfg)
    try:
        ranks.everywhere(prepare_rank, setup.specs, args.eager)
        log.info("TP=%d: %d rank(s) ready in %.0f s", size, size, time.perf_counter() - t0)
        costs = CostModels(setup.cfg, ranks, bandwidth)
        sampler = Sampler(setup.device)
        rows = []
        for point in tqdm(points, desc=f"decode {setup.name} TP={size}", disable=args.no_progress, file=sys.stderr):
            t1 = time.perf_counter()
            rows += bench_point(ranks, sampler, point, modes, args, bandwidth, costs)
            log.info("TP=%d B=%d context=%d: %d modes in %.1f s", size, point.batch, point.context, len(modes),
                     time.perf_counter() - t1)
        add_speedups(rows)
        profile = []
        if setup.device.type == "cuda" and args.profile > 0 and size == 1:
            profile = profile_rows(ranks, sampler, rows, modes, args, costs)
        meta = _meta(setup, args, bandwidth, ranks)
    finally:
        ranks.close()
    return {"meta": meta, "rows": rows, "skipped": setup.skipped, "hf_notes": [], "profile": profile}


def _write(result: dict, out_dir: Path, tag: str) -> None:
    paths = decode_report.write_outputs(result, out_dir, tag)
    log.info("wrote %s", ", ".join(str(p) for p in paths))


def _meta(setup: Setup, args, bandwidth: float | None, ranks: Ranks) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from polarsparse.engine.cuda_graphs import fused_method_names

    return {
        "model_config": setup.name, "config": setup.cfg.to_dict(), "layers": setup.cfg.num_layers,
        "device_name": roofline.device_name(setup.device) if setup.device.type == "cuda" else "cpu",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
        "dtype": str(setup.dtype).replace("torch.", ""), "block_size": args.block_size, "steps": args.steps,
        "command": "polarsparse bench decode " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "decode"] else sys.argv[1:]),
        "copy_bandwidth_gbs": bandwidth and bandwidth / 1e9, "router_rank": args.router_rank,
        "sparse_modes": ", ".join(s.label for s in setup.specs) or "none",
        "cuda_graphs": ranks.local.graphs.capture, "fused_ops": fused_method_names(ranks.local.model),
        "positions_extended_to": setup.extended_to, "model_spec": setup.model_spec,
        "tensor_parallel": [_tp_meta(ranks)],
    }


def _tp_meta(ranks: Ranks) -> dict:
    """How one tensor-parallel size ran: graph capture with collectives inside can fall back to eager."""
    graphs = ranks.local.graphs
    captured, built = ranks.graphs_captured() if graphs.capture else (0, graphs.num_captured)
    backend = None if ranks.size == 1 else ("nccl" if ranks.local.device.type == "cuda" else "gloo")
    return {"size": ranks.size, "backend": backend,
            "graphs_captured": captured, "steps_built": built, "eager_fallback": graphs.capture and captured < built}


def _short_device(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((g for g in ("h100", "h200", "a100", "l40s", "b200") if g in name), "gpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)  # a run stopped by `timeout` shows where it was
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `pkill -USR1`: where is every rank now?
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
