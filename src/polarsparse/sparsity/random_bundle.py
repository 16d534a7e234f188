"""Random router bundles for random-weight models (``synthetic:`` specs): speed and equivalence runs.

A bundle made here has the real router shapes of the model, N(0, 0.02) weights drawn from a fixed
seed (so the same bundle every time), a flat calibration (one MLP top-k for every layer and batch
bucket) and the model's fingerprint, so the engine loads it like a trained one and, under tensor
parallelism, every rank takes its slice of it (sparsity/sharding.py). Its choices are arbitrary:
it measures what sparse decoding costs and checks that TP=N reproduces TP=1, not accuracy.
"""
from __future__ import annotations

from pathlib import Path

import torch

from polarsparse.config import ModelConfig
from polarsparse.sparsity.bundle import RouterBundle, model_identity, tensor_name
from polarsparse.sparsity.planner import BATCH_BUCKETS, mlp_k_for_density

ROUTER_STD = 0.02


def random_bundle(cfg: ModelConfig, rank: int = 64, mlp_density: float | None = 0.25, head_density: float = 0.5,
                  k_multiple: int = 128, seed: int = 0) -> RouterBundle:
    """Head routers (KV groups and query heads) and MLP routers of rank ``rank`` for every layer.

    mlp_density: the calibrated MLP top-k of every layer and bucket (None: no MLP routers, MLP dense).
    """
    from polarsparse.models.loader import build_model

    with torch.device("meta"):
        identity = model_identity(build_model(cfg))
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * ROUTER_STD

    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    tensors = {}
    for i in range(layers):
        for unit, n in (("kv", cfg.num_kv_heads), ("query", cfg.num_heads)):
            prefix = tensor_name(i, f"head_{unit}")
            tensors.update({f"{prefix}.proj.weight": rand(n, d), f"{prefix}.proj.bias": rand(n)})
        if mlp_density is not None:
            prefix = tensor_name(i, "mlp")
            tensors.update({f"{prefix}.down.weight": rand(rank, d), f"{prefix}.up.weight": rand(inter, rank),
                            f"{prefix}.up.bias": rand(inter)})
    k = None if mlp_density is None else mlp_k_for_density(inter, mlp_density, k_multiple)
    manifest = {
        "model": {"name": f"random-{cfg.model_type}", **identity},
        "routers": {"mlp_rank": rank, "hidden": d, "neurons": inter,
                    "head_units": {"kv": cfg.num_kv_heads, "query": cfg.num_heads}},
        "training": {"random": True, "seed": seed},
        "calibration": {"buckets": list(BATCH_BUCKETS), "mlp_k": {str(b): [k] * layers for b in BATCH_BUCKETS},
                        "settings": {"k_multiple": k_multiple, "random": True}},
        "defaults": {"head_unit": "kv", "head_density": head_density, "head_budget": "uniform",
                     "mlp": mlp_density is not None},
    }
    return RouterBundle(manifest, tensors)


def save_random_bundle(cfg: ModelConfig, path: str | Path, **kwargs) -> Path:
    """random_bundle(cfg, **kwargs) saved to ``path`` (fp32, so every rank reads the same values)."""
    return random_bundle(cfg, **kwargs).save(Path(path), dtype=torch.float32)
