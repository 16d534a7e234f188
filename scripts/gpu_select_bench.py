"""Micro-benchmark of the decode-time top-k selections on one CUDA GPU: torch vs Triton.

    PYTHONPATH=src python scripts/gpu_select_bench.py [--reps 20] [--trials 50]

Times, per call, under CUDA-graph replay (``--reps`` calls captured in one graph, the graph
replayed ``--trials`` times, median of the trials divided by reps):

* union: ``old`` = ``torch.topk(scores.amax(0), k).indices.sort().values`` (the previous
  implementation), ``ref`` = today's torch reference (exact tie rule; the CPU path and the
  fallback above ``select.MAX_TRITON_N``), ``new`` = ``select.union_topk`` (Triton);
  I in {16384, 14336}, B in {1, 8, 32, 64, 256}, k = 10/30/50% of I rounded down to 64.
* head: ``old`` = ``torch.topk(scores, k, dim=1).indices.sort(dim=1).values``, ``ref``,
  ``new`` = ``select.head_topk``; B in {64, 256}, U in {8, 32}, k = U/2.

Every Triton result is checked for exact equality with the reference (same indices, same
order) on bf16 router-like scores; a mismatch aborts. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch


def graph_time_us(fn, reps: int, trials: int) -> float:
    """Median per-call time of fn under CUDA-graph replay, in microseconds."""
    fn()  # compile / warm the allocator outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(trials):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def router_scores(batch: int, n: int, seed: int) -> torch.Tensor:
    """bf16 logits with a heavy tail, like an MLP router's (many bf16 ties, as in practice)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, n, device="cuda", generator=g)
    return (x * 2 - 3 + torch.randn(1, n, device="cuda", generator=g)).to(torch.bfloat16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="calls captured per graph")
    parser.add_argument("--trials", type=int, default=50, help="graph replays timed")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2

    import triton

    from polarsparse.kernels import reference as ref
    from polarsparse.kernels import select

    print(f"# top-k selection: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; CUDA-graph replay, median of {args.trials} x "
          f"{args.reps} calls\n")

    print("## union_topk (scores [B, I] bf16 -> [k])\n")
    print("| I | B | k | old µs | ref µs | new µs | speedup vs old |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (16384, 14336):
        for batch in (1, 8, 32, 64, 256):
            scores = router_scores(batch, n, seed=batch)
            for frac in (0.1, 0.3, 0.5):
                k = int(frac * n) // 64 * 64
                got, want = select.union_topk(scores, k), ref.mlp_union_topk(scores, k)
                if not torch.equal(got, want):
                    print(f"MISMATCH union I={n} B={batch} k={k}", file=sys.stderr)
                    return 1
                old = graph_time_us(lambda: torch.topk(scores.amax(dim=0), k).indices.sort().values,
                                    args.reps, args.trials)
                rf = graph_time_us(lambda: ref.mlp_union_topk(scores, k), args.reps, args.trials)
                new = graph_time_us(lambda: select.union_topk(scores, k), args.reps, args.trials)
                print(f"| {n} | {batch} | {k} | {old:.1f} | {rf:.1f} | {new:.1f} "
                      f"| {old / new:.2f}x |", flush=True)

    print("\n## head_topk (scores [B, U] bf16 -> [B, k])\n")
    print("| B | U | k | old µs | ref µs | new µs | speedup vs old |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (64, 256):
        for units in (8, 32):
            k = units // 2
            scores = router_scores(batch, units, seed=units)
            got, want = select.head_topk(scores, k), ref.head_topk(scores, k)
            if not torch.equal(got, want):
                print(f"MISMATCH head B={batch} U={units} k={k}", file=sys.stderr)
                return 1
            old = graph_time_us(lambda: torch.topk(scores, k, dim=1).indices.sort(dim=1).values,
                                args.reps, args.trials)
            rf = graph_time_us(lambda: ref.head_topk(scores, k), args.reps, args.trials)
            new = graph_time_us(lambda: select.head_topk(scores, k), args.reps, args.trials)
            print(f"| {batch} | {units} | {k} | {old:.1f} | {rf:.1f} | {new:.1f} "
                  f"| {old / new:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
