"""Attaching a router bundle to a loaded model: resolve, validate, merge settings, build planners.

``routers``: None (dense), "default" (the bundle shipped for the embedded default model) or a
bundle directory. Settings left as None in SparsityConfig take the bundle's defaults.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from polarsparse.config import SparsityConfig
from polarsparse.models.embedded import DEFAULT_MODEL_NAME, default_model_dir
from polarsparse.sparsity.bundle import BundleError, RouterBundle
from polarsparse.distributed.state import SINGLE, TensorParallel
from polarsparse.sparsity.sharding import local_k, shard_layer_routers
from polarsparse.sparsity.planner import BundlePlanners, head_budgets, mlp_k_for_density

log = logging.getLogger(__name__)

DEFAULT_ROUTERS = "default"


def default_bundle_dir() -> Path:
    """The router bundle shipped inside the package for the embedded default model."""
    return Path(str(resources.files("polarsparse") / "data" / "routers" / DEFAULT_MODEL_NAME))


def implicit_routers(model: str | None) -> str | None:
    """Routers to use when none were named: the shipped bundle for the embedded default model (when
    it is installed), else None (dense)."""
    if model in (None, "", "default") and (default_bundle_dir() / "manifest.json").is_file():
        return DEFAULT_ROUTERS
    return None


def resolve_routers(routers: str | Path | None, model_path: Path) -> Path | None:
    if routers is None:
        return None
    if str(routers) != DEFAULT_ROUTERS:
        return Path(routers).expanduser()
    if Path(model_path).resolve() != default_model_dir().resolve():
        raise BundleError(f"the default router bundle is for {DEFAULT_MODEL_NAME}; for {model_path} train "
                          "routers (polarsparse routers collect/train/calibrate) and pass their directory")
    path = default_bundle_dir()
    if not (path / "manifest.json").is_file():
        raise BundleError(f"the shipped router bundle is missing from {path}; reinstall polarsparse or run dense")
    return path


@dataclass
class SparseSetup:
    """What an engine runs: the resolved settings and the planner factory (None: dense)."""

    config: SparsityConfig
    bundle_path: Path | None = None
    factory: BundlePlanners | None = None

    def describe(self) -> str:
        if self.factory is None:
            return "dense (no routers)" if self.bundle_path is None else f"dense (routers {self.bundle_path} disabled)"
        c = self.config
        heads = (f"heads {c.head_unit} {c.head_density:.0%} ({c.head_budget}, layer 0 dense)"
                 if c.attention else "heads dense")
        if not c.mlp:
            mlp = "MLP dense"
        elif c.mlp_density is not None:
            mlp = f"MLP fixed {c.mlp_density:.0%}"
        else:
            mlp = "MLP calibrated top-k by batch size"
        return f"sparse decode, routers {self.bundle_path}: {heads}, {mlp}"


def resolve_config(cfg: SparsityConfig, defaults: dict) -> SparsityConfig:
    """Fill every None field from the bundle's defaults (then built-in ones)."""
    builtin = {"mlp": False, "head_density": 0.5, "head_unit": "kv", "head_budget": "uniform"}
    fill = {k: defaults.get(k, v) for k, v in builtin.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill)


def make_planners(bundle: RouterBundle, cfg: SparsityConfig, device: torch.device | str,
                  dtype: torch.dtype, tp: TensorParallel = SINGLE) -> BundlePlanners:
    """Per-bucket RouterPlanners for a resolved config (for this tensor-parallel rank's shard)."""
    cal = bundle.calibration
    n_layers, units = bundle.num_layers, bundle.manifest["routers"]["head_units"][cfg.head_unit]
    if cfg.attention:
        importance = cal.get("head_importance", {}).get(cfg.head_unit)
        heads = head_budgets(units, n_layers, cfg.head_density, cfg.head_budget, importance)
    else:
        heads = [None] * n_layers
    buckets = [int(b) for b in cal["buckets"]]
    if not cfg.mlp:
        mlp = {b: [None] * n_layers for b in buckets}
    elif cfg.mlp_density is not None:
        fixed = mlp_k_for_density(bundle.manifest["routers"]["neurons"], cfg.mlp_density,
                                  cal["settings"]["k_multiple"])
        mlp = {b: [fixed] * n_layers for b in buckets}
    else:
        mlp = {b: list(cal["mlp_k"][str(b)]) for b in buckets}
    routers: nn.ModuleList = bundle.layer_routers(cfg.head_unit, mlp=cfg.mlp, device=device, dtype=dtype)
    shards = tp.size if tp.size > 1 else cfg.selection_shards
    if shards > 1:  # per-shard k: every rank (or emulated rank) selects among its own units
        neurons, mult = bundle.manifest["routers"]["neurons"], cal["settings"]["k_multiple"]
        heads = [local_k(k, units, shards) for k in heads]
        calibrated = cal.get("mlp_k_sharded", {}).get(str(shards))
        if cfg.mlp and cfg.mlp_density is None and calibrated:  # per-rank k measured by `routers calibrate`
            mlp = {b: list(calibrated[str(b)]) for b in buckets}
        else:  # the global k split evenly
            mlp = {b: [local_k(k, neurons, shards, mult) for k in ks] for b, ks in mlp.items()}
    for i in cfg.dense_layers:
        heads[i] = None
        for b in buckets:
            mlp[b][i] = None
    if tp.size > 1:
        return BundlePlanners(shard_layer_routers(routers, tp), heads, mlp, cfg.head_unit)
    return BundlePlanners(routers, heads, mlp, cfg.head_unit, shards)


def build_sparse_setup(model: nn.Module, model_path: Path, routers: str | Path | None,
                       sparsity: SparsityConfig | None, device: torch.device | str,
                       dtype: torch.dtype) -> SparseSetup:
    """Load, validate and attach ``routers`` to ``model`` (see the module docstring)."""
    cfg = sparsity or SparsityConfig()
    path = resolve_routers(routers, model_path)
    if path is None:
        return SparseSetup(cfg)
    bundle = RouterBundle.load(path)
    bundle.check_model(model)
    cfg = resolve_config(cfg, bundle.defaults)
    if not cfg.enabled:
        return SparseSetup(cfg, path)
    setup = SparseSetup(cfg, path, make_planners(bundle, cfg, device, dtype, getattr(model, "tp", SINGLE)))
    log.info("%s", setup.describe())
    return setup
