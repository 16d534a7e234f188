"""Tensor-parallel part of the decode benchmark's report: scaling table, goals and plot.

Scaling efficiency of a mode at a point = step(TP=1) / (N * step(TP=N)) (1.0: N GPUs make the step
N times faster). The sparse/dense speedup at TP=N is compared with the one at TP=1 on the same
point: sparsity should keep paying when each rank holds 1/N of the heads and neurons.
"""
from __future__ import annotations

import logging
from pathlib import Path

from polarsparse.bench.plotting import headless_pyplot

log = logging.getLogger(__name__)

SPEEDUP_GAP_MAX = 0.10  # |speedup(TP=N) / speedup(TP=1) - 1|
EFFICIENCY_MIN = 0.75  # at TP=2, for the large shape


def tp_of(row: dict) -> int:
    return row.get("tp", 1)


def tp_sizes(result: dict) -> list[int]:
    return sorted({tp_of(r) for r in result["rows"] if r["mode"] == "dense"})


def scaling_rows(result: dict) -> list[dict]:
    """One row per (TP size > 1, point, engine mode) that TP=1 also ran: efficiency and speedups."""
    rows = [r for r in result["rows"] if not r["mode"].startswith("transformers") and r["step_ms"]]
    base = {(r["batch"], r["context"], r["mode"]): r for r in rows if tp_of(r) == 1}
    out = []
    for r in rows:
        n, one = tp_of(r), base.get((r["batch"], r["context"], r["mode"]))
        if n == 1 or one is None:
            continue
        ratio = (r["speedup_vs_dense"] / one["speedup_vs_dense"]
                 if r.get("speedup_vs_dense") and one.get("speedup_vs_dense") else None)
        out.append({"tp": n, "batch": r["batch"], "context": r["context"], "mode": r["mode"],
                    "step_ms": r["step_ms"], "step_ms_tp1": one["step_ms"],
                    "efficiency": one["step_ms"] / (n * r["step_ms"]),
                    "speedup_vs_dense": r.get("speedup_vs_dense"), "speedup_vs_dense_tp1": one.get("speedup_vs_dense"),
                    "speedup_ratio": ratio})
    return sorted(out, key=lambda s: (s["tp"], s["context"], s["batch"], s["mode"]))


def tp_goals(result: dict, goal) -> list[dict]:
    """The issue's goals per TP size > 1 (``goal`` builds one goal dict, see decode_report)."""
    scaling = scaling_rows(result)
    goals = []
    for n in sorted({s["tp"] for s in scaling}):
        mine = [s for s in scaling if s["tp"] == n]
        sparse = [s for s in mine if s["mode"] != "dense" and s["speedup_ratio"] is not None]
        best = max(sparse, key=lambda s: s["speedup_vs_dense_tp1"], default=None)
        where = f" (B={best['batch']}, ctx={best['context']}, {best['mode']})" if best else ""
        gap = best and abs(best["speedup_ratio"] - 1)
        goals.append(goal(f"TP={n}: sparse/dense speedup vs TP=1's, relative gap at the best TP=1 point{where}",
                          gap, SPEEDUP_GAP_MAX, "<="))
        dense = [s for s in mine if s["mode"] == "dense"]
        big = max(dense, key=lambda s: (s["batch"] * s["context"], s["batch"]), default=None)
        where = f" (B={big['batch']}, ctx={big['context']})" if big else ""
        goals.append(goal(f"TP={n}: dense scaling efficiency at the largest point{where}", big and big["efficiency"],
                          EFFICIENCY_MIN if n == 2 else None, ">="))
    return goals


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def tp_markdown(result: dict) -> list[str]:
    """The '## Tensor parallelism' section (empty when only one size ran)."""
    scaling = scaling_rows(result)
    runs = result["meta"].get("tensor_parallel", [])
    if not scaling:
        return []
    lines = ["", "## Tensor parallelism", "",
             "Efficiency = step(TP=1) / (N x step(TP=N)); speedups are sparse/dense at the same TP size. "
             "Per-rank bytes and rooflines are in the results table (each rank reads 1/N of the weights and KV).", ""]
    for run in runs:
        graphs = ("CUDA graphs with the collectives inside" if run["graphs_captured"] else "eager")
        if run.get("eager_fallback"):
            graphs = f"CUDA graphs for {run['graphs_captured']} of {run['steps_built']} steps (rest eager)"
        lines.append(f"- TP={run['size']}: {run['backend'] or 'single process'}, {graphs}")
    lines += ["", "| TP | B | context | mode | step ms | TP=1 step ms | efficiency | speedup | TP=1 speedup | ratio |",
              "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in scaling:
        lines.append(f"| {s['tp']} | {s['batch']} | {s['context']} | {s['mode']} | {_f(s['step_ms'])} | "
                     f"{_f(s['step_ms_tp1'])} | {_f(s['efficiency'])} | {_f(s['speedup_vs_dense'])} | "
                     f"{_f(s['speedup_vs_dense_tp1'])} | {_f(s['speedup_ratio'])} |")
    return lines


def plot_tp(result: dict, path: Path) -> bool:
    """Per context: step time vs batch per (TP size, mode), and scaling efficiency vs batch."""
    plt = headless_pyplot()
    if plt is None:
        return False
    rows = [r for r in result["rows"] if r["step_ms"] and not r["mode"].startswith("transformers")]
    scaling = scaling_rows(result)
    contexts = sorted({r["context"] for r in rows})
    if not contexts:
        return False
    modes = sorted({r["mode"] for r in rows}, key=lambda m: (m != "dense", m))
    sizes = sorted({tp_of(r) for r in rows})
    styles = {n: s for n, s in zip(sizes, ["-", "--", ":", "-."] * 4)}
    fig, axes = plt.subplots(2, len(contexts), figsize=(4.8 * len(contexts), 7), squeeze=False)
    for col, ctx in enumerate(contexts):
        top, bottom = axes[0][col], axes[1][col]
        for i, mode in enumerate(modes):
            for n in sizes:
                pts = sorted((r["batch"], r["step_ms"]) for r in rows
                             if r["context"] == ctx and r["mode"] == mode and tp_of(r) == n)
                if pts:
                    top.plot(*zip(*pts), marker="o", linestyle=styles[n], color=f"C{i}", label=f"{mode} TP={n}")
                eff = sorted((s["batch"], s["efficiency"]) for s in scaling
                             if s["context"] == ctx and s["mode"] == mode and s["tp"] == n)
                if eff:
                    bottom.plot(*zip(*eff), marker="o", linestyle=styles[n], color=f"C{i}", label=f"{mode} TP={n}")
        top.set(title=f"context {ctx}", xscale="log", yscale="log", xlabel="batch", ylabel="ms / step")
        bottom.axhline(EFFICIENCY_MIN, color="grey", linewidth=0.8)
        bottom.set(xscale="log", xlabel="batch", ylabel="scaling efficiency")
        top.legend(fontsize=6)
        bottom.legend(fontsize=6)
    fig.suptitle(f"{result['meta']['model_config']} tensor-parallel decode on {result['meta']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
