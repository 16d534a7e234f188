"""Kernel timeline of one captured decode step (GPU): which kernels a step runs, how long each
takes, and how much of the step is gaps between kernels.

    PYTHONPATH=src python3 scripts/gpu_step_trace.py --model-config llama-3-8b --layers 4 \
        --batch 8 --context 1024 [--head-density 0.5] [--mlp-density 0.1 | --mlp-table]

Builds the random-weight model like `bench decode`, decodes two steps on the CUDA-graph path, then
replays the step under torch.profiler and prints, per kernel name, count / total / mean time, and
the step's wall time vs the sum of its kernels (the difference is launch gaps and idle time).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from polarsparse.bench.decode import Point, _engine_steps, _prefilled_seqs
from polarsparse.bench.decode_sparsity import CostModel, SparsitySpec, load_mlp_table, planner_factory, random_routers
from polarsparse.bench.decode_tp import prepare_rank, start_ranks
from polarsparse.config import EngineConfig
from polarsparse.engine.sampling import Sampler
from polarsparse.models.synthetic import SyntheticSpec


def _timed_us(step, dev: torch.device) -> float:
    if dev.type != "cuda":
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="llama-3-8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--head-density", type=float, default=None)
    p.add_argument("--mlp-density", type=float, default=None)
    p.add_argument("--mlp-table", action="store_true", help="the shipped OPT-6.7B per-batch top-k table")
    p.add_argument("--top", type=int, default=25)

    p.add_argument("--device", default="cuda:0")
    args = p.parse_args()
    dev = torch.device(args.device)
    spec_name = str(SyntheticSpec(args.model_config, args.layers))
    ecfg = EngineConfig(max_num_seqs=max(args.batch, 1), block_size=32, max_model_len=args.context + 64,
                        num_kv_blocks=args.batch * (args.context // 32 + 4) + 8)
    ranks = start_ranks(spec_name, torch.bfloat16, dev, ecfg)
    runner = ranks.local
    prepare_rank(runner, [], eager=False)
    sparse = args.head_density is not None or args.mlp_density is not None or args.mlp_table
    if sparse:
        spec = SparsitySpec("trace", args.head_density, load_mlp_table() if args.mlp_table else None, args.mlp_density)
        routers = random_routers(runner.cfg, spec, torch.bfloat16, dev, seed=1)
        runner.planner_factory = planner_factory(runner.cfg, spec, routers, args.context,
                                                 CostModel(head_overhead_s=0.0, mlp_overhead_s=0.0))
    seqs = _prefilled_seqs(runner, Point(args.batch, args.context), 3, seed=1)
    _engine_steps(runner, Sampler(dev, 0), seqs, 2)
    step = runner.graphs.last_step
    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)  # CPU: a smoke run
    sync()
    walls = [_timed_us(step, dev) for _ in range(10)]
    with profile(activities=[ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]) as prof:
        step()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name[:90]].append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
    total = sum(sum(v) for v in by_name.values())
    wall = statistics.median(walls)
    mode = "sparse" if sparse else "dense"
    print(f"## {args.model_config} ({args.layers} layers) B={args.batch} ctx={args.context} {mode}: "
          f"step {wall:.0f} us (median of 10 replays), {len(kernels)} kernels = {len(kernels) / args.layers:.1f}/layer, "
          f"kernel time {total:.0f} us, gaps {wall - total:.0f} us ({(wall - total) / max(1, len(kernels)):.2f} us/kernel)")
    print("| kernel | count | total us | mean us |\n| --- | ---: | ---: | ---: |")
    for name, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"| `{name}` | {len(ts)} | {sum(ts):.1f} | {statistics.mean(ts):.2f} |")
    ranks.close()


if __name__ == "__main__":
    main()
