"""Human-readable views of a router bundle's manifest: summary text, markdown tables, the plot of
batch-union growth of active neurons ("MLP sparsity vanishes with batch size")."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _k_cell(k: int | None, needed: int, neurons: int) -> str:
    return f"dense ({needed / neurons:.0%})" if k is None else f"{k} ({k / neurons:.0%})"


def calibration_summary(manifest: dict) -> str:
    cal, neurons = manifest["calibration"], manifest["routers"]["neurons"]
    lines = [f"MLP top-k at batch-union recall >= {cal['settings']['target']} "
             f"(k multiple {cal['settings']['k_multiple']}, {cal['heldout_tokens']} held-out tokens):"]
    for b in cal["buckets"]:
        ks = cal["mlp_k"][str(b)]
        kept = [neurons if k is None else k for k in ks]
        lines.append(f"  batch {b:>3}: mean kept {np.mean(kept) / neurons:6.1%}, dense layers "
                     f"{sum(k is None for k in ks):>2}/{len(ks)}, true union density "
                     f"{np.mean(cal['union_density'][str(b)]):6.1%}")
    return "\n".join(lines)


def router_quality_markdown(manifest: dict) -> str:
    """Per-layer table: held-out recall/precision of every router and the chosen k per batch size."""
    stats, cal = manifest["training"]["heldout_stats"], manifest["calibration"]
    neurons, buckets = manifest["routers"]["neurons"], cal["buckets"]
    units = manifest["routers"]["head_units"]
    head = ["layer", "active/token", "MLP recall", "MLP precision", "recall @k(B=1)",
            f"KV-group top-{stats['head_fraction']:.0%} recall", f"query-head top-{stats['head_fraction']:.0%} recall"]
    head += [f"k B={b}" for b in buckets]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(len(stats["mlp_recall"])):
        cells = [str(i), f"{stats['mlp_true_density'][i]:.1%}", f"{stats['mlp_recall'][i]:.3f}",
                 f"{stats['mlp_precision'][i]:.3f}", f"{cal['mlp_recall']['1'][i]:.3f}",
                 f"{stats['head_kv_recall'][i]:.3f}", f"{stats['head_query_recall'][i]:.3f}"]
        cells += [_k_cell(cal["mlp_k"][str(b)][i], cal["mlp_k_needed"][str(b)][i], neurons) for b in buckets]
        rows.append("| " + " | ".join(cells) + " |")
    note = (f"\nHead units: {units['kv']} KV groups, {units['query']} query heads per layer. "
            "MLP recall/precision: router logit > 0 vs active labels, per token. "
            "`recall @k(B=1)`: recall of the calibrated top-k at batch 1. `k B=..`: neurons kept "
            f"(of {neurons}) for that batch-size bucket; `dense (x%)` = the layer's MLP runs dense because the "
            "target needs x% of its neurons, above the density limit.\n")
    return "\n".join(rows) + "\n" + note


def union_growth_markdown(manifest: dict) -> str:
    cal, neurons = manifest["calibration"], manifest["routers"]["neurons"]
    rows = ["| batch size | true union of active neurons (mean over layers) | min layer | max layer | "
            "k needed for the recall target (mean) | mean k served | dense layers |", "|---|---|---|---|---|---|---|"]
    for b in cal["buckets"]:
        u = cal["union_density"][str(b)]
        ks = [neurons if k is None else k for k in cal["mlp_k"][str(b)]]
        needed = np.mean(cal["mlp_k_needed"][str(b)]) / neurons
        rows.append(f"| {b} | {np.mean(u):.1%} | {min(u):.1%} | {max(u):.1%} | {needed:.1%} | {np.mean(ks) / neurons:.1%} | "
                    f"{sum(k is None for k in cal['mlp_k'][str(b)])} |")
    return "\n".join(rows) + "\n"


def plot_union_growth(manifest: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal, neurons = manifest["calibration"], manifest["routers"]["neurons"]
    buckets = cal["buckets"]
    union = np.array([cal["union_density"][str(b)] for b in buckets])  # [buckets, L]
    kept = np.array([[neurons if k is None else k for k in cal["mlp_k"][str(b)]] for b in buckets]) / neurons
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = union.shape[1]
    for i in range(layers):
        ax.plot(buckets, union[:, i], color=matplotlib.colormaps["viridis"](i / max(1, layers - 1)), lw=0.8, alpha=0.6)
    ax.plot(buckets, union.mean(axis=1), "k-o", lw=2, label="true union, mean over layers")
    needed = np.array([cal["mlp_k_needed"][str(b)] for b in buckets]) / neurons
    ax.plot(buckets, needed.mean(axis=1), "r--s", lw=2, label=f"router k for batch-union recall {cal['settings']['target']}")
    ax.plot(buckets, kept.mean(axis=1), "b:^", lw=1.5, label=f"k served (dense above {cal['settings']['density_limit']:.0%})")
    reference = _paper_reference()
    if reference:
        ax.plot(list(reference), list(reference.values()), color="grey", ls="-.", marker="x",
                label="OPT-6.7B (ReLU), paper's k at recall 0.99")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("batch size (tokens decoded together)")
    ax.set_ylabel("fraction of MLP neurons")
    name = manifest["model"].get("name", "model")
    ax.set_title(f"{name}: batch union of active MLP neurons\n(thin lines: layers, dark = early, yellow = late)",
                 fontsize=10)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _paper_reference() -> dict[int, float]:
    """Mean fraction of OPT-6.7B neurons kept per batch size in the paper's published table (if shipped)."""
    from importlib import resources

    path = resources.files("polarsparse") / "data" / "opt-6.7b-mlp-topk.csv"
    if not path.is_file():
        return {}
    rows = [line.split(",") for line in path.read_text().splitlines() if line and line[0].isdigit()]
    by_batch: dict[int, list[int]] = {}
    for _, batch, k in rows:
        by_batch.setdefault(int(batch), []).append(int(k))
    return {b: float(np.mean(ks)) / 16384 for b, ks in sorted(by_batch.items())}


def write_router_report(manifest: dict, stem: Path) -> list[Path]:
    """``stem``.md (router quality + union growth tables) and ``stem``-union.png."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    md.write_text(f"## Router quality per layer\n\n{router_quality_markdown(manifest)}\n"
                  f"## Batch-union growth of active MLP neurons\n\n{union_growth_markdown(manifest)}")
    png = plot_union_growth(manifest, stem.parent / f"{stem.name}-union.png")
    return [md, png]
