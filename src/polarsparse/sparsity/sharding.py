"""Router planners under tensor parallelism: each rank selects among the heads/KV groups and MLP
neurons it owns, from its slice of the routers' outputs, with per-rank k so every rank does the same
work. (The routers' first layers are replicated; only their output rows are split.)"""
from __future__ import annotations

import math

import torch
from torch import nn

from polarsparse import kernels
from polarsparse.config import ConfigError
from polarsparse.distributed.state import TensorParallel
from polarsparse.sparsity.routers import HeadRouter, LayerRouters, MLPRouter


def _rows(t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's block of rows of a router output weight or bias."""
    n = tp.split(t.shape[0], "router outputs")
    return t[tp.rank * n : (tp.rank + 1) * n]


def _shard_head(r: HeadRouter, tp: TensorParallel) -> HeadRouter:
    out = HeadRouter(r.proj.in_features, tp.split(r.proj.out_features, "head router units"))
    out.load_state_dict({k: _rows(v, tp) for k, v in r.state_dict().items()})
    return out


def _shard_mlp(r: MLPRouter, tp: TensorParallel) -> MLPRouter:
    out = MLPRouter(r.down.in_features, r.down.out_features, tp.split(r.up.out_features, "MLP router neurons"))
    state = {k: (v if k.startswith("down.") else _rows(v, tp)) for k, v in r.state_dict().items()}
    out.load_state_dict(state)
    return out


def shard_layer_routers(routers: nn.ModuleList, tp: TensorParallel) -> nn.ModuleList:
    """Per-layer routers whose outputs are this rank's units and neurons only."""
    ref = next(routers.parameters())
    out = [
        LayerRouters(None if r.head is None else _shard_head(r.head, tp), None if r.mlp is None else _shard_mlp(r.mlp, tp))
        for r in routers
    ]
    return nn.ModuleList(out).to(ref.device, ref.dtype).eval().requires_grad_(False)


def local_k(k: int | None, total: int, shards: int, multiple: int = 1) -> int | None:
    """A global top-k as the top-k of one of ``shards`` equal shards (None: dense)."""
    if k is None:
        return None
    if total % shards:
        raise ConfigError(f"{total} router units cannot be split into {shards} equal shards")
    kl = -(-math.ceil(k / shards) // multiple) * multiple
    return None if kl >= total // shards else max(1, kl)


def sharded_head_topk(scores: torch.Tensor, k: int, shards: int) -> torch.Tensor:
    """scores [B, U] -> [B, shards * k]: the top-k of each contiguous shard of U/shards units."""
    b, u = scores.shape
    per = u // shards
    idx = kernels.head_topk(scores.reshape(b * shards, per), k).view(b, shards, k)
    offsets = torch.arange(shards, device=scores.device).view(1, shards, 1) * per
    return (idx + offsets).view(b, shards * k)


def sharded_union_topk(scores: torch.Tensor, k: int, shards: int) -> torch.Tensor:
    """scores [B, I] -> [shards * k]: the batch-union top-k of each contiguous shard of neurons."""
    union = scores.amax(dim=0).view(1, -1)  # [1, I]
    return sharded_head_topk(union, k, shards).view(-1)
