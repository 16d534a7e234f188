"""``polarsparse routers collect``: run the dense model over real text and record, per layer, the
router input, which MLP neurons are active and the per-head attention output norms.

Text is cut into windows of ``window`` tokens; documents are split (by document, with a seed) into a
training part and a held-out part (calibration/validation), so no held-out token's document is ever
trained on. Rows stream to memory-mapped arrays (see store.py); rerunning the same command resumes.
"""
from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from polarsparse.eval.scoring import dense_prefill
from polarsparse.eval.tasks import load_corpus
from polarsparse.sparsity.activity import contribution_scale, head_norms, neuron_contributions, silu_threshold
from polarsparse.sparsity.bundle import model_identity
from polarsparse.sparsity.store import ActivationStore, StoreError, pack_bits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectSettings:
    data: str = "train"
    tokens: int = 65536
    window: int = 512
    holdout: float = 0.15  # fraction of documents held out (calibration / validation)
    keep: float = 0.95  # gated SiLU: output-norm fraction the active neurons must reproduce
    seed: int = 0
    batch_tokens: int = 4096  # tokens per dense prefill call

    def key(self) -> dict:
        """What must match for a run to resume an existing directory."""
        return {k: v for k, v in self.__dict__.items() if k != "batch_tokens"}


# ----------------------------------------------------------------------------------------------
# text -> windows
# ----------------------------------------------------------------------------------------------
def split_windows(tokenizer, docs: list[str], s: CollectSettings) -> tuple[list[list[int]], list[list[int]]]:
    """(train windows, held-out windows) of ``s.window`` tokens, about ``s.tokens`` in all."""
    docs = list(docs)
    random.Random(s.seed).shuffle(docs)
    n_held = max(1, round(len(docs) * s.holdout)) if s.holdout > 0 else 0
    held_docs, train_docs = docs[:n_held], docs[n_held:]
    n_windows = max(1, s.tokens // s.window)
    n_held_w = max(1, round(n_windows * s.holdout)) if n_held else 0
    train = _windows(tokenizer, train_docs, s.window, n_windows - n_held_w)
    held = _windows(tokenizer, held_docs, s.window, n_held_w)
    return train, held


def _windows(tokenizer, docs: list[str], window: int, count: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        if len(stream) >= count * window:
            break
        stream += tokenizer.encode(doc, add_special_tokens=False) + ([eos] if eos is not None else [])
    out = [stream[i:i + window] for i in range(0, len(stream) - window + 1, window)][:count]
    if len(out) < count:
        log.warning("text has only %d windows of %d tokens (asked for %d)", len(out), window, count)
    return out


# ----------------------------------------------------------------------------------------------
# recording hooks
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Forward pre-hooks on every layer's attention, o_proj and MLP; rows of the last call per layer."""

    def __init__(self, model, thresholds: list[float] | None):
        self.model, self.thresholds = model, thresholds
        self.scales = [contribution_scale(layer.mlp) for layer in model.layers]
        self.rows: dict[str, list] = {}
        self.handles = []
        for i, layer in enumerate(model.layers):
            self.handles += [
                layer.attn.register_forward_pre_hook(functools.partial(self._on_attn, i)),
                layer.attn.o_proj.register_forward_pre_hook(functools.partial(self._on_heads, i)),
                layer.mlp.register_forward_pre_hook(functools.partial(self._on_mlp, i)),
            ]

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def reset(self) -> None:
        n = len(self.model.layers)
        self.rows = {k: [None] * n for k in ("router_inputs", "mlp_active", "head_norms", "group_norms", "mlp_x")}

    def _on_attn(self, i, module, args) -> None:
        self.rows["router_inputs"][i] = args[0].detach().to(torch.float16).cpu().numpy()  # [N, d]

    def _on_heads(self, i, module, args) -> None:
        attn = self.model.layers[i].attn
        q, g = head_norms(args[0], module.weight, attn.num_heads, attn.num_kv_heads)  # [N, Hq], [N, Hkv]
        self.rows["head_norms"][i] = q.to(torch.float16).cpu().numpy()
        self.rows["group_norms"][i] = g.to(torch.float16).cpu().numpy()

    def _on_mlp(self, i, module, args) -> None:
        x = args[0].detach()
        if self.thresholds is None:  # threshold calibration pass: keep the raw MLP inputs
            self.rows["mlp_x"][i] = x.float().cpu()
            return
        c = neuron_contributions(module, x, self.scales[i])  # [N, I]
        self.rows["mlp_active"][i] = pack_bits((c > self.thresholds[i]).cpu().numpy())

    def stacked(self) -> dict[str, np.ndarray]:
        """[N, L, ...] arrays of the last call."""
        return {k: np.stack(v, axis=1) for k, v in self.rows.items() if k != "mlp_x"}


def calibrate_thresholds(engine, windows: list[list[int]], keep: float) -> list[float]:
    """Per-layer activity thresholds (0 for ReLU; calibrated on ``windows`` for gated SiLU)."""
    model = engine.model
    if model.cfg.activation == "relu":
        return [0.0] * model.cfg.num_layers
    with Recorder(model, None) as rec:
        rec.reset()
        with dense_prefill(engine.runner, [tuple(w) for w in windows], max_tokens=1 << 30):
            pass
        xs = rec.rows["mlp_x"]
    return [silu_threshold(layer.mlp, x, keep) for layer, x in
            tqdm(list(zip(model.layers, xs)), desc="activity thresholds", leave=False)]


# ----------------------------------------------------------------------------------------------
# the collection run
# ----------------------------------------------------------------------------------------------
def collect(engine, out: Path, settings: CollectSettings, overwrite: bool = False) -> ActivationStore:
    """Collect (or resume collecting) router data into ``out``."""
    model, cfg = engine.model, engine.model.cfg
    ident = {**model_identity(model), "name": engine.model_path.name}
    train, held = split_windows(engine.tokenizer, load_corpus(settings.data), settings)
    windows = train + held
    if not windows:
        raise StoreError(f"no {settings.window}-token windows in corpus {settings.data!r}")
    store = _open_or_create(out, settings, ident, len(train), len(windows), overwrite)
    if "thresholds" not in store.meta["activity"]:
        calib = train[: max(1, 1024 // settings.window)]
        store.meta["activity"]["thresholds"] = calibrate_thresholds(engine, calib, settings.keep)
        store.update_meta()
    thresholds = store.meta["activity"]["thresholds"]
    per_call = max(1, settings.batch_tokens // settings.window)
    first = store.tokens_done // settings.window
    with Recorder(model, thresholds) as rec, tqdm(total=store.capacity, initial=store.tokens_done,
                                                  desc="collect", unit="tok") as bar:
        for start in range(first, len(windows), per_call):
            group = [tuple(w) for w in windows[start:start + per_call]]
            rec.reset()
            with dense_prefill(engine.runner, group, max_tokens=1 << 30):
                pass
            store.append(rec.stacked())
            bar.update(sum(len(w) for w in group))
    _record_density(store)
    return store


def _open_or_create(out: Path, s: CollectSettings, ident: dict, n_train: int, n_total: int,
                    overwrite: bool) -> ActivationStore:
    out = Path(out)
    if (out / "meta.json").is_file() and not overwrite:
        store = ActivationStore.open(out, writable=True)
        if store.meta["settings"] != s.key() or store.meta["model"]["fingerprint"] != ident["fingerprint"]:
            raise StoreError(f"{out} holds data collected with other settings or another model; "
                             "use --overwrite or another --out")
        log.info("resuming %s at %d/%d tokens", out, store.tokens_done, store.capacity)
        return store
    cfg_shapes = {"num_layers": ident["num_layers"], "hidden": ident["hidden_size"],
                  "neurons": ident["intermediate_size"], "heads": ident["num_heads"],
                  "kv_heads": ident["num_kv_heads"]}
    kind = "relu" if ident["activation"] == "relu" else "silu_threshold"
    return ActivationStore.create(out, {
        "model": ident, "settings": s.key(), "shapes": cfg_shapes,
        "capacity": n_total * s.window, "train_tokens": n_train * s.window,
        "activity": {"kind": kind, "keep": s.keep if kind != "relu" else None},
    })


def _record_density(store: ActivationStore) -> None:
    """Mean fraction of active neurons per layer (on up to 4096 held-out tokens)."""
    rows = store.split("heldout")
    rows = slice(rows.start, min(rows.stop, rows.start + 4096))
    density = store.mlp_labels(rows).mean(axis=(0, 2)) if rows.stop > rows.start else []
    store.meta["activity"]["density"] = [round(float(x), 4) for x in density]
    store.update_meta()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    from polarsparse.cli import add_model_arguments

    add_model_arguments(p)
    d = CollectSettings()
    p.add_argument("--data", default=d.data, help="text: coqa, squad, lambada, train (=coqa+squad), eval "
                   "(=lambada), A+B, or a .txt/.jsonl file (default: train; keep it disjoint from eval text)")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"tokens to record in all (default {d.tokens})")
    p.add_argument("--window", type=int, default=d.window, help=f"tokens per text window (default {d.window})")
    p.add_argument("--holdout", type=float, default=d.holdout, help="fraction of documents held out for "
                   f"calibration/validation (default {d.holdout})")
    p.add_argument("--keep", type=float, default=d.keep, help="gated SiLU models: fraction of the MLP output "
                   f"norm the active neurons must reproduce (default {d.keep})")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per prefill call")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, required=True, help="output directory (rerun to resume)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out has data")


def run(args) -> int:
    from polarsparse.engine.engine import LLMEngine

    settings = CollectSettings(args.data, args.tokens, args.window, args.holdout, args.keep, args.seed,
                               args.batch_tokens)
    engine = LLMEngine(args.model, dtype=args.dtype, device=args.device)
    store = collect(engine, args.out, settings, overwrite=args.overwrite)
    dens = store.meta["activity"]["density"]
    print(f"collected {store.tokens_done} tokens ({store.meta['train_tokens']} train, "
          f"{store.tokens_done - store.meta['train_tokens']} held-out) into {args.out}")
    if dens:
        print(f"active MLP neurons per token: mean {np.mean(dens):.1%}, layer min {min(dens):.1%}, "
              f"max {max(dens):.1%} ({store.meta['activity']['kind']})")
    return 0
