"""Decode benchmark outputs: goal checks, JSON, a markdown report and a plot."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from polarsparse.bench.plotting import headless_pyplot
from polarsparse.bench.decode_tp_report import plot_tp, tp_goals, tp_markdown, tp_of, tp_sizes

log = logging.getLogger(__name__)

DENSE_ROOFLINE_MAX = 1.15  # our dense step / dense roofline, for B >= 8
SPARSE_ROOFLINE_MAX = 1.2  # sparse step / its own roofline
NEVER_SLOWER = 0.98  # sparse / dense speedup at every grid point
# model config -> (best sparse/dense speedup wanted, smallest B * context considered)
SPEEDUP_TARGETS = {"opt-6.7b": (2.2, 0), "llama-3-8b": (1.5, 128 * 1024)}


def _rows(result: dict, mode_prefix: str) -> list[dict]:
    """Rows of one mode family at the smallest tensor-parallel size run (the single-GPU goals)."""
    base = min(tp_sizes(result), default=1)
    return [r for r in result["rows"] if r["mode"].startswith(mode_prefix) and r["step_ms"] is not None
            and tp_of(r) == base]


def evaluate_goals(result: dict) -> list[dict]:
    """The issue's goals, each with the measured value and pass/fail (None: no data)."""
    goals = []
    dense = [r for r in _rows(result, "dense") if r["batch"] >= 8 and r["x_roofline"] is not None]
    worst = max((r["x_roofline"] for r in dense), default=None)
    goals.append(_goal("dense step / dense roofline, B >= 8 (worst point)", worst, DENSE_ROOFLINE_MAX, "<="))
    sparse = _rows(result, "sparse")
    target = SPEEDUP_TARGETS.get(result["meta"]["model_config"])
    min_tokens = target[1] if target else 0
    eligible = [r for r in sparse if r["batch"] * r["context"] >= min_tokens and r["speedup_vs_dense"]]
    best = max(eligible, key=lambda r: r["speedup_vs_dense"], default=None)
    where = f" at B*context >= {min_tokens // 1024}k tokens" if min_tokens else ""
    label = f"best sparse/dense speedup{where}" + (f" (B={best['batch']}, ctx={best['context']}, {best['mode']})" if best else "")
    goals.append(_goal(label, best and best["speedup_vs_dense"], target[0] if target else None, ">="))
    slowest = min((r["speedup_vs_dense"] for r in sparse if r["speedup_vs_dense"]), default=None)
    goals.append(_goal("sparse/dense speedup, slowest grid point", slowest, NEVER_SLOWER, ">="))
    roof = max((r["x_roofline"] for r in sparse if r["x_roofline"] is not None), default=None)
    goals.append(_goal("sparse step / sparse roofline (worst point)", roof, SPARSE_ROOFLINE_MAX, "<="))
    return goals + tp_goals(result, _goal)


def _goal(name: str, value: float | None, target: float | None, op: str) -> dict:
    ok = None if value is None or target is None else (value <= target if op == "<=" else value >= target)
    return {"goal": name, "value": value, "target": None if target is None else f"{op} {target}", "pass": ok}


def write_outputs(result: dict, out_dir: Path, tag: str) -> list[Path]:
    """Write <tag>.json, <tag>.md and <tag>.png; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result["goals"] = evaluate_goals(result)
    paths = [out_dir / f"{tag}.json", out_dir / f"{tag}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result, tag))
    png = out_dir / f"{tag}.png"
    if (plot_tp if len(tp_sizes(result)) > 1 else plot)(result, png):
        paths.append(png)
    return paths


# --------------------------------------------------------------------------- markdown
def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(result: dict, tag: str) -> str:
    m = result["meta"]
    lines = [
        f"# Decode benchmark: {m['model_config']} on {m['device_name']}",
        "",
        f"{m['date']} · torch {m['torch']} · triton {m['triton']} · transformers {m['transformers']} · "
        f"{m['dtype']} · KV block {m['block_size']} · copy bandwidth {_f(m['copy_bandwidth_gbs'], 0)} GB/s",
        "",
        f"Command: `{m['command']}`",
        "",
        f"Model: `{m.get('model_spec') or m['model_config']}` ({m['layers']} layers, random weights).",
        "",
        f"Engine: CUDA graphs {'on' if m['cuda_graphs'] else 'off'}; fused small ops: {', '.join(m['fused_ops']) or 'none'}. "
        f"Sparse modes: {m['sparse_modes']}. Router rank {m['router_rank']} (random routers: speed depends on k only). "
        + (f"Position table extended to {m['positions_extended_to']} (speed only). " if m.get("positions_extended_to") else "")
        + f"Step = median GPU time of one replayed decode step (model + LM head); e2e = median wall time of an engine "
        f"step (prepare inputs, replay, greedy sample, host sync); tokens/s = batch / e2e. Roofline = bytes the step "
        f"must move / copy bandwidth.",
        "",
        "## Goals",
        "",
        "| goal | measured | target | pass |",
        "| --- | --- | --- | --- |",
    ]
    for g in result.get("goals", []):
        lines.append(f"| {g['goal']} | {_f(g['value'])} | {g['target'] or '-'} | "
                     f"{'-' if g['pass'] is None else ('yes' if g['pass'] else 'NO')} |")
    lines += tp_markdown(result)
    lines += ["", "## Results", "",
              "| TP | B | context | mode | step ms | roofline ms | x roofline | e2e ms | tokens/s | vs dense | heads kept | MLP kept |",
              "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(result["rows"], key=lambda r: (tp_of(r), r["context"], r["batch"], r["mode"])):
        lines.append(
            f"| {tp_of(r)} | {r['batch']} | {r['context']} | {r['mode']} | {_f(r['step_ms'])} | {_f(r['roofline_ms'])} | "
            f"{_f(r['x_roofline'])} | {_f(r['e2e_ms'])} | {_f(r['tokens_per_s'], 0)} | {_f(r['speedup_vs_dense'])} | "
            f"{_pct(r.get('head_density'))} | {_pct(r.get('mlp_density'))} |")
    if result.get("hf_notes"):
        lines += ["", "transformers settings: " + "; ".join(result["hf_notes"])]
    if result["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- B={s['batch']}, context={s['context']}: {s['reason']}" for s in result["skipped"]]
    for p in result.get("profile", []):
        lines += ["", f"## Per-op time: B={p['batch']}, context={p['context']}, {p['mode']} (step {_f(p['step_ms'])} ms)", "",
                  "| op | ms | share |", "| --- | ---: | ---: |"]
        lines += [f"| {op} | {_f(v, 3)} | {100 * v / p['step_ms']:.0f}% |" for op, v in p["ops"].items()]
    return "\n".join(lines) + "\n"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


# --------------------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> bool:
    """Step latency vs batch per context (modes solid, rooflines dashed) and sparse speedups."""
    plt = headless_pyplot()
    if plt is None:
        return False
    rows = [r for r in result["rows"] if r["step_ms"] is not None]
    contexts = sorted({r["context"] for r in rows})
    if not contexts:
        return False
    modes = sorted({r["mode"] for r in rows}, key=lambda m: (not m.startswith("transformers"), m != "dense", m))
    colors = {m: f"C{i}" for i, m in enumerate(modes)}  # one colour per mode in every panel
    fig, axes = plt.subplots(2, len(contexts), figsize=(4.5 * len(contexts), 7), squeeze=False)
    for col, ctx in enumerate(contexts):
        top, bottom = axes[0][col], axes[1][col]
        for mode in modes:
            pts = sorted((r["batch"], r) for r in rows if r["context"] == ctx and r["mode"] == mode)
            if not pts:
                continue
            top.plot([b for b, _ in pts], [r["step_ms"] for _, r in pts], marker="o", label=mode, color=colors[mode])
            roof = [(b, r["roofline_ms"]) for b, r in pts if r["roofline_ms"]]
            if roof:
                top.plot(*zip(*roof), linestyle="--", color=colors[mode], alpha=0.6)
            if mode.startswith("sparse"):
                bottom.plot([b for b, _ in pts], [r["speedup_vs_dense"] for _, r in pts], marker="o",
                            color=colors[mode], label=mode)
        top.set(title=f"context {ctx}", xscale="log", yscale="log", xlabel="batch", ylabel="ms / step (dashed: roofline)")
        bottom.axhline(1.0, color="grey", linewidth=0.8)
        bottom.set(xscale="log", xlabel="batch", ylabel="sparse speedup vs dense")
        top.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xticks(sorted({r["batch"] for r in rows}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    fig.suptitle(f"{result['meta']['model_config']} decode on {result['meta']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_table(result: dict) -> str:
    """A short plain-text table for terminals (headline rows + goals)."""
    out = [f"{result['meta']['model_config']} on {result['meta']['device_name']}"]
    out.append(f"{'TP':>2} {'B':>4} {'ctx':>6} {'mode':<14} {'step ms':>8} {'x roof':>7} {'tok/s':>8} {'vs dense':>8}")
    for r in sorted(result["rows"], key=lambda r: (tp_of(r), r["context"], r["batch"], r["mode"])):
        out.append(f"{tp_of(r):>2} {r['batch']:>4} {r['context']:>6} {r['mode']:<14} {_f(r['step_ms']):>8} {_f(r['x_roofline']):>7} "
                   f"{_f(r['tokens_per_s'], 0):>8} {_f(r['speedup_vs_dense']):>8}")
    for g in result.get("goals", []):
        status = "-" if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        out.append(f"[{status}] {g['goal']}: {_f(g['value'])} (target {g['target'] or '-'})")
    return "\n".join(out)
