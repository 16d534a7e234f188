"""``polarsparse routers calibrate``: the dynamic, layer-wise top-k tables of a router bundle.

MLP: for each layer and each batch-size bucket B in {1, 2, ..., 256}, the smallest k (a multiple of
``k_multiple``) such that the top-k of the batch-max router logits covers, on average over sampled
held-out batches of B tokens, at least ``target`` of the union of truly active neurons of those B
tokens. k never decreases with B. A layer whose k exceeds ``density_limit`` of its neurons runs its
MLP dense for that bucket and every larger one.

Heads: the importance profile of each layer (mean share of the attention output norm carried by its
1st, 2nd, ... strongest unit) is recorded so that per-layer head budgets can be derived at run time
for any density (see planner.head_budgets).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from polarsparse.sparsity.bundle import RouterBundle
from polarsparse.sparsity.planner import BATCH_BUCKETS
from polarsparse.sparsity.store import ActivationStore, StoreError

log = logging.getLogger(__name__)


MIN_TOKEN_DRAWS = 2048  # held-out tokens drawn per bucket, at least


@dataclass(frozen=True)
class CalibrateSettings:
    target: float = 0.99
    k_multiple: int = 128
    density_limit: float = 0.9
    samples: int = 16  # sampled batches per bucket (at least MIN_TOKEN_DRAWS tokens in all)
    max_tokens: int = 8192  # held-out tokens used
    seed: int = 0
    shards: tuple[int, ...] = (2, 4, 8)  # tensor-parallel sizes to calibrate per-rank k for


@dataclass
class LayerCurve:
    """One layer's calibration: chosen k and what it achieves, per bucket."""

    k: list[int | None]  # None: dense
    k_needed: list[int]  # k reaching the target before the density limit (monotone)
    recall: list[float]
    precision: list[float]
    union_density: list[float]
    k_sharded: dict[int, list[int | None]] = field(default_factory=dict)  # shards -> per-rank k (None: dense), per bucket


def cumulative_hits(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """scores [R, I] union router scores, truth [R, I] bool union of active neurons ->
    hits [R, I]: truly active neurons among the top-(j+1) scores, for every j."""
    order = scores.argsort(dim=1, descending=True)
    return truth.gather(1, order).float().cumsum(dim=1)


def smallest_k(curve: torch.Tensor, target: float, multiple: int) -> int:
    """The smallest multiple of ``multiple`` (capped at I) whose recall reaches ``target``."""
    n = curve.numel()
    reach = torch.nonzero(curve >= target - 1e-9)
    k = int(reach[0]) + 1 if reach.numel() else n
    return min(n, -(-k // multiple) * multiple)


def recall_curve(scores: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean batch-union recall of the top-(j+1) scores [I], hits [R, I])."""
    hits = cumulative_hits(scores, truth)
    return (hits / truth.sum(dim=1, keepdim=True).clamp_min(1)).mean(dim=0), hits


def sharded_k(scores: torch.Tensor, truth: torch.Tensor, shards: int, s: CalibrateSettings) -> int:
    """Per-rank k when each of ``shards`` contiguous neuron shards selects its own top-k with one
    k for all (equal work per rank): the largest k any shard needs to reach the recall target
    within itself."""
    per = scores.shape[1] // shards
    return max(smallest_k(recall_curve(scores[:, j * per:(j + 1) * per], truth[:, j * per:(j + 1) * per])[0],
                          s.target, s.k_multiple) for j in range(shards))


def next_k(prev: tuple[int, bool], needed: int, limit: float) -> tuple[int, bool]:
    """(k, dense) for the next bucket: k never decreases with the batch size, and once k exceeds
    ``limit`` neurons the layer stays dense for every larger bucket."""
    k = max(prev[0], needed)
    return k, prev[1] or k > limit


def calibrate_layer(logits: torch.Tensor, labels: torch.Tensor, s: CalibrateSettings,
                    buckets: tuple[int, ...], gen: torch.Generator) -> LayerCurve:
    """logits [T, I] router outputs and labels [T, I] bool on held-out tokens."""
    t, n = labels.shape
    curve = LayerCurve([], [], [], [], [])
    shard_counts = [m for m in s.shards if m > 1 and n % m == 0]
    prev_local = {m: (0, False) for m in shard_counts}  # (k so far, dense) per shard count
    k, dense = 0, False
    for b in buckets:
        draws = max(s.samples, -(-MIN_TOKEN_DRAWS // b))  # small batches: more batches, same token count
        idx = torch.stack([torch.randperm(t, generator=gen)[: min(b, t)] for _ in range(draws)])  # [R, B]
        scores, truth = logits[idx].amax(dim=1), labels[idx].any(dim=1)  # [R, I]
        recall, hits = recall_curve(scores, truth)  # [I], [R, I]
        for m in shard_counts:  # the same rules as the global k, within each rank's shard
            prev_local[m] = k_local, dense_local = next_k(prev_local[m], sharded_k(scores, truth, m, s),
                                                          s.density_limit * (n // m))
            curve.k_sharded.setdefault(m, []).append(None if dense_local else k_local)
        k, dense = next_k((k, dense), smallest_k(recall, s.target, s.k_multiple), s.density_limit * n)
        kk = n if dense else k
        curve.k.append(None if dense else k)
        curve.k_needed.append(k)
        curve.recall.append(round(float(recall[kk - 1]), 4))
        curve.precision.append(round(float(hits[:, kk - 1].mean() / kk), 4))
        curve.union_density.append(round(float(truth.float().mean()), 4))
    return curve


def head_importance(norms: torch.Tensor) -> list[float]:
    """norms [T, U] -> mean share of the total carried by the strongest, 2nd strongest, ... unit."""
    shares = norms.sort(dim=1, descending=True).values / norms.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return [round(float(v), 4) for v in shares.mean(dim=0)]


def calibrate(bundle: RouterBundle, store: ActivationStore, s: CalibrateSettings,
              buckets: tuple[int, ...] = BATCH_BUCKETS) -> dict:
    rows = store.split("heldout")
    rows = slice(rows.start, min(rows.stop, rows.start + s.max_tokens))
    if rows.stop - rows.start < max(buckets):
        raise StoreError(f"{store.path}: only {rows.stop - rows.start} held-out tokens; calibration needs at "
                         f"least {max(buckets)} (collect more tokens or a larger --holdout)")
    routers = bundle.layer_routers("kv", mlp=True)
    gen = torch.Generator().manual_seed(s.seed)
    curves: list[LayerCurve] = []
    for i in tqdm(range(bundle.num_layers), desc="calibrate", unit="layer"):
        x = torch.from_numpy(np.asarray(store.arrays["router_inputs"][rows, i], np.float32))  # [T, d]
        with torch.no_grad():
            logits = routers[i].mlp(x)  # [T, I]
        labels = torch.from_numpy(store.mlp_labels(rows, i))  # [T, I]
        curves.append(calibrate_layer(logits, labels, s, buckets, gen))
    per_bucket = lambda attr: {str(b): [getattr(c, attr)[j] for c in curves]  # noqa: E731
                               for j, b in enumerate(buckets)}
    norms = {"kv": store.arrays["group_norms"][rows], "query": store.arrays["head_norms"][rows]}
    return {
        "settings": asdict(s), "heldout_tokens": rows.stop - rows.start, "buckets": list(buckets),
        "mlp_k": per_bucket("k"), "mlp_k_needed": per_bucket("k_needed"), "mlp_recall": per_bucket("recall"), "mlp_precision": per_bucket("precision"),
        "union_density": per_bucket("union_density"),
        "mlp_k_sharded": {str(m): {str(b): [c.k_sharded[m][j] for c in curves] for j, b in enumerate(buckets)}
                          for m in curves[0].k_sharded},
        "head_importance": {u: [head_importance(torch.from_numpy(np.asarray(a[:, i], np.float32)))
                                for i in range(bundle.num_layers)] for u, a in norms.items()},
    }


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    d = CalibrateSettings()
    p.add_argument("--routers", type=Path, required=True, help="router bundle (updated in place)")
    p.add_argument("--data", type=Path, required=True, help="collection directory (its held-out part is used)")
    p.add_argument("--target", type=float, default=d.target, help="batch-union recall target (default 0.99)")
    p.add_argument("--k-multiple", type=int, default=d.k_multiple, help="round k up to this multiple (default 128)")
    p.add_argument("--density-limit", type=float, default=d.density_limit,
                   help="a layer needing more than this fraction of its neurons runs dense (default 0.9)")
    p.add_argument("--samples", type=int, default=d.samples, help="sampled batches per batch size")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="held-out tokens to use")
    p.add_argument("--mlp-default", choices=("on", "off", "keep"), default="keep",
                   help="whether engines use the MLP routers unless told otherwise (default: keep the bundle's)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write the router-quality markdown table and union-growth plot with this path stem")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shards", default=",".join(map(str, d.shards)),
                   help="tensor-parallel sizes to calibrate per-rank MLP k for (comma list; '' = none)")


def run(args) -> int:
    from polarsparse.sparsity import report

    bundle = RouterBundle.load(args.routers)
    store = ActivationStore.open(args.data)
    if store.meta["model"]["fingerprint"] != bundle.manifest["model"]["fingerprint"]:
        raise StoreError(f"{args.data} was collected on another model than {args.routers} was trained for")
    s = CalibrateSettings(args.target, args.k_multiple, args.density_limit, args.samples, args.max_tokens, args.seed,
                          tuple(int(v) for v in args.shards.split(",") if v))
    bundle.manifest["calibration"] = calibrate(bundle, store, s)
    if args.mlp_default != "keep":
        bundle.manifest.setdefault("defaults", {})["mlp"] = args.mlp_default == "on"
    bundle.save_manifest()
    print(report.calibration_summary(bundle.manifest))
    if args.report:
        for path in report.write_router_report(bundle.manifest, args.report):
            print(f"wrote {path}")
    return 0
