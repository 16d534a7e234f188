"""``polarsparse routers train``: fit every layer's MLP and head routers on collected data.

All layers train together as batched matrix products (one optimizer, one pass over the data per
epoch), which is what makes CPU training of 30+ layers practical. Per layer:

* MLP router: d -> rank -> I logits, weighted BCE against the active-neuron labels (positives are
  weighted by neg/pos, capped, because active neurons are the rare class on ReLU models);
* head routers, one per unit: d -> Hkv (KV groups: what the GPU kernel serves) and d -> Hq (query
  heads: finer, reference path), BCE against "unit is in the top ``head_fraction`` by output norm".

Inputs are standardised per layer during training; the statistics are folded into the exported
weights, so a router reads the raw normed hidden state. Recall/precision are measured on the
held-out documents.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from polarsparse.sparsity.bundle import RouterBundle, tensor_name
from polarsparse.sparsity.planner import head_k
from polarsparse.sparsity.store import ActivationStore, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 128
    epochs: int = 8
    batch: int = 1024
    lr: float = 2e-3
    head_fraction: float = 0.5
    max_pos_weight: float = 10.0
    max_train_tokens: int | None = None
    seed: int = 0
    device: str = "cpu"  # a GPU helps for large models; small ones train fine on CPU


class StackedLinear(nn.Module):
    """L independent linear maps applied at once: x [L, B, i] -> [L, B, o]."""

    def __init__(self, layers: int, fan_in: int, fan_out: int, bias: bool):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(layers, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(layers, fan_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias[:, None, :], x, self.weight)


class StackedRouters(nn.Module):
    """Every layer's routers; ``forward`` returns logits for mlp [L,B,I], kv [L,B,Hkv], query [L,B,Hq]."""

    def __init__(self, layers: int, d: int, rank: int, neurons: int, heads: int, kv_heads: int):
        super().__init__()
        self.down = StackedLinear(layers, d, rank, bias=False)
        self.up = StackedLinear(layers, rank, neurons, bias=True)
        self.kv = StackedLinear(layers, d, kv_heads, bias=True)
        self.query = StackedLinear(layers, d, heads, bias=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mlp": self.up(self.down(x)), "kv": self.kv(x), "query": self.query(x)}


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class Batches:
    """Rows of one split, loaded into memory, served as [L, B, ...] training tensors."""

    def __init__(self, store: ActivationStore, split: str, limit: int | None = None, device: str = "cpu"):
        rows = store.split(split)
        stop = rows.stop if limit is None else min(rows.stop, rows.start + limit)
        if stop <= rows.start:
            raise StoreError(f"{store.path} has no {split} rows; collect more tokens")
        rows = slice(rows.start, stop)
        self.neurons, self.device = store.shapes.neurons, torch.device(device)
        self.x = torch.from_numpy(np.array(store.arrays["router_inputs"][rows]))  # [T, L, d] fp16
        self.active = np.ascontiguousarray(store.arrays["mlp_active"][rows])  # [T, L, I/8]
        self.norms = {"query": torch.from_numpy(np.asarray(store.arrays["head_norms"][rows], np.float32)),
                      "kv": torch.from_numpy(np.asarray(store.arrays["group_norms"][rows], np.float32))}

    def __len__(self) -> int:
        return self.x.shape[0]

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx].to(self.device).float().transpose(0, 1)  # [L, B, d]

    def mlp_labels(self, idx: torch.Tensor) -> torch.Tensor:
        bits = np.unpackbits(self.active[idx.numpy()], axis=-1, count=self.neurons)
        return torch.from_numpy(bits).to(self.device).transpose(0, 1).float()  # [L, B, I]

    def head_norms(self, unit: str, idx: torch.Tensor) -> torch.Tensor:
        return self.norms[unit][idx].to(self.device).transpose(0, 1)  # [L, B, U]

    def input_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer mean and std of the router input: [L, d] each."""
        x = self.x[: 16384].float()
        return x.mean(0).to(self.device), x.std(0).clamp_min(1e-4).to(self.device)


def top_fraction_labels(norms: torch.Tensor, fraction: float) -> torch.Tensor:
    """norms [..., U] -> float labels, 1 for the ceil(fraction * U) largest."""
    k = head_k(norms.shape[-1], fraction)
    idx = norms.topk(k, dim=-1).indices
    return torch.zeros_like(norms).scatter_(-1, idx, 1.0)



# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def train_routers(store: ActivationStore, s: TrainSettings) -> tuple[dict[str, torch.Tensor], dict]:
    """Train on the store's train split; returns (bundle tensors, held-out stats per layer)."""
    torch.manual_seed(s.seed)
    data = Batches(store, "train", s.max_train_tokens, s.device)
    sh = store.shapes
    model = StackedRouters(sh.num_layers, sh.hidden, s.rank, sh.neurons, sh.heads, sh.kv_heads).to(s.device)
    mean, std = data.input_stats()  # [L, d]
    pos_weight = _pos_weight(data, s.max_pos_weight)  # [L, 1, 1]
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
    steps = s.epochs * math.ceil(len(data) / s.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(s.seed)
    with tqdm(total=steps, desc="train routers", unit="step") as bar:
        for epoch in range(s.epochs):
            for idx in torch.randperm(len(data), generator=gen).split(s.batch):
                loss = _loss(model, data, idx.sort().values, mean, std, pos_weight, s.head_fraction)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
                bar.update(1)
    tensors = {k: v.cpu() for k, v in export_tensors(model, mean, std).items()}
    stats = validate(model, Batches(store, "heldout", 8192, s.device), mean, std, s.head_fraction)
    return tensors, stats


def _pos_weight(data: Batches, cap: float) -> torch.Tensor:
    density = data.mlp_labels(torch.arange(min(len(data), 4096))).mean(dim=(1, 2))
    return ((1 - density) / density.clamp_min(1e-6)).clamp(1.0, cap)[:, None, None]


def _loss(model, data: Batches, idx, mean, std, pos_weight, fraction) -> torch.Tensor:
    out = model((data.inputs(idx) - mean[:, None]) / std[:, None])
    loss = F.binary_cross_entropy_with_logits(out["mlp"], data.mlp_labels(idx), pos_weight=pos_weight)
    for unit in ("kv", "query"):
        labels = top_fraction_labels(data.head_norms(unit, idx), fraction)
        loss = loss + F.binary_cross_entropy_with_logits(out[unit], labels)
    return loss


def export_tensors(model: StackedRouters, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer nn.Linear weights ([out, in]) with the input standardisation folded in."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(mean.shape[0]):
            m, s = mean[i], std[i]
            down = model.down.weight[i] / s[:, None]  # [d, r]
            up_w, up_b = model.up.weight[i], model.up.bias[i]  # [r, I], [I]
            p = tensor_name(i, "mlp")
            out[f"{p}.down.weight"] = down.t().contiguous()
            out[f"{p}.up.weight"] = up_w.t().contiguous()
            out[f"{p}.up.bias"] = up_b - (m @ down) @ up_w
            for unit, lin in (("kv", model.kv), ("query", model.query)):
                w = lin.weight[i] / s[:, None]  # [d, U]
                p = tensor_name(i, f"head_{unit}")
                out[f"{p}.proj.weight"] = w.t().contiguous()
                out[f"{p}.proj.bias"] = lin.bias[i] - m @ w
    return out


@torch.no_grad()
def validate(model: StackedRouters, data: Batches, mean, std, fraction: float, batch: int = 1024) -> dict:
    """Held-out per-layer MLP recall/precision (logit > 0) and head top-k recall per unit."""
    sums: dict[str, torch.Tensor] = {}
    for idx in torch.arange(len(data)).split(batch):
        out = model((data.inputs(idx) - mean[:, None]) / std[:, None])
        y, pred = data.mlp_labels(idx).bool(), out["mlp"] > 0
        _add(sums, "tp", (y & pred).sum(dim=(1, 2)))
        _add(sums, "pos", y.sum(dim=(1, 2)))
        _add(sums, "pred", pred.sum(dim=(1, 2)))
        for unit in ("kv", "query"):
            truth = top_fraction_labels(data.head_norms(unit, idx), fraction).bool()
            chosen = top_fraction_labels(out[unit], fraction).bool()
            _add(sums, f"{unit}_hit", (truth & chosen).sum(dim=(1, 2)))
            _add(sums, f"{unit}_k", truth.sum(dim=(1, 2)))
    n_cells = len(data) * model.up.weight.shape[2]
    r = lambda t: [round(float(v), 4) for v in t]  # noqa: E731
    return {
        "tokens": len(data),
        "mlp_recall": r(sums["tp"] / sums["pos"].clamp_min(1)),
        "mlp_precision": r(sums["tp"] / sums["pred"].clamp_min(1)),
        "mlp_true_density": r(sums["pos"] / n_cells),
        "mlp_pred_density": r(sums["pred"] / n_cells),
        "head_fraction": fraction,
        **{f"head_{u}_recall": r(sums[f"{u}_hit"] / sums[f"{u}_k"]) for u in ("kv", "query")},
    }


def _add(sums: dict, key: str, value: torch.Tensor) -> None:
    sums[key] = sums.get(key, 0) + value.double()


# ----------------------------------------------------------------------------------------------
# bundle
# ----------------------------------------------------------------------------------------------
def build_bundle(store: ActivationStore, s: TrainSettings) -> RouterBundle:
    tensors, stats = train_routers(store, s)
    sh = store.shapes
    manifest = {
        "model": store.meta["model"],
        "routers": {"mlp_rank": s.rank, "hidden": sh.hidden, "neurons": sh.neurons,
                    "head_units": {"kv": sh.kv_heads, "query": sh.heads}},
        "activity": store.meta["activity"],
        "training": {"data": {**store.meta["settings"], "path": str(store.path),
                              "train_tokens": store.split("train").stop,
                              "heldout_tokens": store.split("heldout").stop - store.split("heldout").start},
                     "settings": asdict(s), "heldout_stats": stats},
        "defaults": {"head_unit": "kv", "head_density": 0.5, "head_budget": "uniform",
                     "mlp": store.meta["activity"]["kind"] == "relu"},
    }
    return RouterBundle(manifest, tensors)


def add_arguments(p) -> None:
    d = TrainSettings()
    p.add_argument("--data", type=Path, required=True, help="directory made by `polarsparse routers collect`")
    p.add_argument("--out", type=Path, required=True, help="router bundle directory to write")
    p.add_argument("--rank", type=int, default=d.rank, help=f"MLP router hidden size (default {d.rank})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--head-fraction", type=float, default=d.head_fraction,
                   help="head labels: the top fraction of heads/groups by output norm (default 0.5)")
    p.add_argument("--max-train-tokens", type=int, default=None, help="use at most this many training rows")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu (default) or cuda")


def run(args) -> int:
    store = ActivationStore.open(args.data)
    store.require_complete()
    s = TrainSettings(args.rank, args.epochs, args.batch, args.lr, args.head_fraction,
                      max_train_tokens=args.max_train_tokens, seed=args.seed, device=args.device)
    bundle = build_bundle(store, s)
    bundle.save(args.out)
    print_stats(bundle.manifest["training"]["heldout_stats"])
    print(f"wrote {args.out} (not calibrated yet: run polarsparse routers calibrate --routers {args.out} "
          f"--data {args.data})")
    return 0


def print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"held-out router quality ({stats['tokens']} tokens)")
    for col in ("layer", "MLP recall", "MLP precision", "active", "KV-group top-k recall", "query-head top-k recall"):
        t.add_column(col, justify="right")
    for i, row in enumerate(zip(stats["mlp_recall"], stats["mlp_precision"], stats["mlp_true_density"],
                                stats["head_kv_recall"], stats["head_query_recall"])):
        t.add_row(str(i), *(f"{v:.3f}" for v in row))
    Console().print(t)
