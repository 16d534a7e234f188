"""What a sparse decode step of the benchmark reads: per-layer (head_k, mlp_k) for a batch bucket.

Top-k comes from a head density (KV groups kept per sequence, layer 0 dense as in the paper) and,
for the MLP, from a calibrated per-layer table by batch size (the shipped OPT-6.7B table, see
``polarsparse/data/opt-6.7b-mlp-topk.csv``) or a fixed density. A cost model then keeps a layer's
attention or MLP dense wherever the sparse version would not be faster (k near full, short
contexts, router cost), so a sparse step is never knowingly slower than the dense one.
Speed depends on k, not on router quality: the routers here are random, of the real shapes.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polarsparse.config import ConfigError, ModelConfig
from polarsparse.sparsity.planner import LayerBudget, RouterPlanner, head_k, mlp_k_for_density
from polarsparse.sparsity.routers import HeadRouter, LayerRouters, MLPRouter
from polarsparse.sparsity.sharding import local_k

NEURON_ROUND = 128  # MLP top-k is a multiple of 128 (as the calibration rounds it)
OPT_MLP_TABLE = "opt-6.7b-mlp-topk.csv"
DEFAULT_BREAK_EVEN = 0.75  # gather-GEMM vs cuBLAS break-even density when the kernels are missing

# batch size -> per-layer MLP k (neurons kept for the whole batch)
MlpTable = dict[int, list[int]]


def load_mlp_table(path: str | Path | None = None) -> MlpTable:
    """Read a ``layer,batch_size,k`` CSV (comment lines start with #); None: the shipped OPT-6.7B one."""
    if path is None:
        text = resources.files("polarsparse").joinpath("data", OPT_MLP_TABLE).read_text()
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read MLP top-k table {path}: {e}") from None
    rows = csv.DictReader(line for line in text.splitlines() if line and not line.startswith("#"))
    by_batch: dict[int, dict[int, int]] = {}
    for r in rows:
        by_batch.setdefault(int(r["batch_size"]), {})[int(r["layer"])] = int(r["k"])
    return {b: [ks[i] for i in sorted(ks)] for b, ks in sorted(by_batch.items())}


def table_row(table: MlpTable, bucket: int) -> list[int]:
    """The per-layer k of the smallest calibrated batch size >= bucket (largest if none)."""
    for b in sorted(table):
        if b >= bucket:
            return table[b]
    return table[max(table)]


@dataclass(frozen=True)
class SparsitySpec:
    """One sparse configuration of the benchmark (None parts stay dense)."""

    label: str
    head_density: float | None = None
    mlp_table: MlpTable | None = None
    mlp_density: float | None = None
    router_rank: int = 256

    @property
    def has_mlp(self) -> bool:
        return self.mlp_table is not None or self.mlp_density is not None


def shard_config(cfg: ModelConfig, shards: int) -> ModelConfig:
    """The shape one of ``shards`` tensor-parallel ranks holds (its heads, KV groups and neurons)."""
    if shards == 1:
        return cfg
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // shards, num_kv_heads=cfg.num_kv_heads // shards,
                               intermediate_size=cfg.intermediate_size // shards)


def requested_budgets(cfg: ModelConfig, spec: SparsitySpec, bucket: int, shards: int = 1) -> list[LayerBudget]:
    """Per-layer budgets before the cost model (layer 0 attention stays dense).

    shards > 1: what each of that many tensor-parallel ranks keeps of its own heads and neurons
    (the global top-k split evenly, MLP k rounded up to NEURON_ROUND; see sparsity/sharding.py)."""
    inter = cfg.intermediate_size
    if spec.mlp_table is not None:
        row = table_row(spec.mlp_table, bucket)
        if len(row) < cfg.num_layers:
            raise ConfigError(f"MLP table has {len(row)} layers, the model {cfg.num_layers}")
        mlp = [min(inter, k) for k in row[: cfg.num_layers]]
    elif spec.mlp_density is not None:
        mlp = [mlp_k_for_density(inter, spec.mlp_density, NEURON_ROUND)] * cfg.num_layers
    else:
        mlp = [None] * cfg.num_layers
    heads = None if spec.head_density is None else head_k(cfg.num_kv_heads, spec.head_density)
    budgets = [LayerBudget(heads if i > 0 else None, mlp[i]) for i in range(cfg.num_layers)]
    if shards == 1:
        return budgets
    return [LayerBudget(local_k(b.head_k, cfg.num_kv_heads, shards), local_k(b.mlp_k, inter, shards, NEURON_ROUND))
            for b in budgets]


# --------------------------------------------------------------------------- cost model
@functools.lru_cache(maxsize=None)
def break_even_density(batch: int, total: int) -> float:
    """Density from which the kernels themselves run the MLP densely (their measured break-even)."""
    try:
        from polarsparse.kernels.mlp import use_dense_fallback
    except ImportError:
        return DEFAULT_BREAK_EVEN
    for k in range(NEURON_ROUND, total + 1, NEURON_ROUND):
        if use_dense_fallback(batch, k, total):
            return k / total
    return 1.0


@dataclass(frozen=True)
class CostModel:
    """Seconds a part of one layer's decode step costs: bytes over bandwidth, plus the fixed cost of
    routing it (router GEMMs, top-k, sort, extra launches), measured on the device by
    :func:`measure_overheads` (the defaults are one H100 measurement: benchmarks/results).

    A sparse part pays only when what it saves exceeds ``margin`` times its routing cost: the margin
    covers the selective kernels' lower occupancy at small k, so a sparse step is not slower.
    """

    bandwidth: float = 3.0e12  # bytes/s (measured copy bandwidth)
    head_overhead_s: float = 30e-6  # head router + per-sequence top-k, one layer
    mlp_overhead_s: float = 100e-6  # MLP router + batch-union top-k, one layer (what it adds beside attention)
    margin: float = 1.5
    # (k, dense seconds, sparse seconds at k) of one layer's MLP timed at this bucket and shape;
    # None: estimate from bytes and the kernels' break-even density
    mlp_timing: tuple[int, float, float] | None = None

    def head_pays(self, cfg: ModelConfig, batch: int, context: int, k: int, elem: int) -> bool:
        if k >= cfg.num_kv_heads:
            return False
        kv_bytes = 2 * batch * context * cfg.num_kv_heads * cfg.head_dim * elem
        saved = (1 - k / cfg.num_kv_heads) * kv_bytes / self.bandwidth
        return saved > self.margin * self.head_overhead_s

    def mlp_pays(self, cfg: ModelConfig, batch: int, k: int, elem: int) -> bool:
        total = cfg.intermediate_size
        even = break_even_density(batch, total)
        if k >= even * total:
            return False
        if self.mlp_timing is not None:  # measured: sparse time scales with the neurons read
            k_timed, dense, sparse_timed = self.mlp_timing
            sparse = sparse_timed * k / k_timed
        else:
            rows = 3 if cfg.activation == "silu_gated" else 2  # gate+up+down or fc1+fc2 rows per neuron
            dense = rows * total * cfg.hidden_size * elem / self.bandwidth
            sparse = (k / total) / even * dense  # gather kernels move bytes `even` times as fast as cuBLAS
        return dense - sparse > self.margin * self.mlp_overhead_s


def measure_overheads(cfg: ModelConfig, spec: SparsitySpec, routers: nn.ModuleList, bucket: int,
                      bandwidth: float, shards: int = 1) -> CostModel:
    """A CostModel whose routing costs are timed on the device at this bucket (layer 1's routers,
    the bucket's median MLP k; CUDA-graph replays minus the fixed cost of a replay). The MLP
    routing runs on a side stream beside attention, so its cost is what it adds to a GEMM the size
    of the layer's attention projections running at the same time. shards > 1: ``routers`` are one
    rank's slice and the k are that rank's."""
    from polarsparse.bench.roofline import launch_floor, time_cuda

    weight = next(routers.parameters())
    h = torch.randn(bucket, cfg.hidden_size, dtype=weight.dtype, device=weight.device)
    floor = launch_floor(weight.device)
    requested = requested_budgets(cfg, spec, bucket, shards)
    budget = requested[1]
    # the lower of two timings: a first timing in a process can carry one-off costs
    timed = lambda fn: min(time_cuda(fn, reps=20) for _ in range(2))  # noqa: E731
    planner = lambda head, mlp: RouterPlanner(routers, [LayerBudget(head, mlp)] * cfg.num_layers)  # noqa: E731

    def head_cost(k: int) -> float:
        p = planner(k, None)
        return max(0.0, timed(lambda: p.plan(1, h)) - floor)

    def mlp_cost(k: int) -> float:
        p = planner(None, k)
        rows = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim // shards  # q, k, v and o rows
        attn = torch.randn(rows, cfg.hidden_size, dtype=weight.dtype, device=weight.device)

        def beside() -> None:
            plan = p.plan(1, h)
            F.linear(h, attn)
            plan.neurons()

        return max(0.0, timed(beside) - timed(lambda: F.linear(h, attn)))

    mlp_ks = sorted(k for k in (b.mlp_k for b in requested) if k is not None)
    k_mid = mlp_ks[len(mlp_ks) // 2] if mlp_ks else None
    return CostModel(
        bandwidth=bandwidth,
        head_overhead_s=head_cost(budget.head_k) if budget.head_k is not None else CostModel.head_overhead_s,
        mlp_overhead_s=mlp_cost(k_mid) if k_mid else CostModel.mlp_overhead_s,
        mlp_timing=time_mlp(shard_config(cfg, shards), h, k_mid, timed) if k_mid else None,
    )


def time_mlp(cfg: ModelConfig, x: torch.Tensor, k: int, timed) -> tuple[int, float, float]:
    """(k, dense s, sparse s) of one random MLP layer of ``cfg``'s (rank's) shape on x [B, d],
    through the engine's own dispatch (gather kernels, or cuBLAS above their break-even)."""
    from polarsparse.models.layers import MLP

    bias = cfg.activation == "relu"  # OPT's MLP has biases, the LLaMA family's has none
    mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation, bias, bias).to(x.device, x.dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.02)
    idx = torch.randperm(cfg.intermediate_size, device=x.device)[:k].sort().values
    with torch.no_grad():
        return k, timed(lambda: mlp(x)), timed(lambda: mlp(x, idx))


def plan_budgets(cfg: ModelConfig, spec: SparsitySpec, bucket: int, context: int, cost: CostModel,
                 elem: int = 2, shards: int = 1) -> list[LayerBudget]:
    """requested_budgets with every part that would not pay set back to None (dense); shards > 1:
    one tensor-parallel rank's budgets, costed on that rank's share of the model."""
    out, rank = [], shard_config(cfg, shards)
    for b in requested_budgets(cfg, spec, bucket, shards):
        heads = b.head_k if b.head_k is not None and cost.head_pays(rank, bucket, context, b.head_k, elem) else None
        mlp = b.mlp_k if b.mlp_k is not None and cost.mlp_pays(rank, bucket, b.mlp_k, elem) else None
        out.append(LayerBudget(heads, mlp))
    return out


def is_dense(budgets: list[LayerBudget]) -> bool:
    return all(b.head_k is None and b.mlp_k is None for b in budgets)


# --------------------------------------------------------------------------- routers, planners
def random_routers(cfg: ModelConfig, spec: SparsitySpec, dtype: torch.dtype, device: torch.device | str,
                   seed: int = 0) -> nn.ModuleList:
    """Per-layer routers of the real shapes with N(0, 0.02) weights (layer 0 has no head router)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for i in range(cfg.num_layers):
        head = HeadRouter(cfg.hidden_size, cfg.num_kv_heads) if spec.head_density is not None and i > 0 else None
        mlp = MLPRouter(cfg.hidden_size, spec.router_rank, cfg.intermediate_size) if spec.has_mlp else None
        layers.append(LayerRouters(head, mlp))
    routers = nn.ModuleList(layers).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in routers.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return routers.eval().requires_grad_(False)


def planner_factory(cfg: ModelConfig, spec: SparsitySpec, routers: nn.ModuleList, context: int,
                    cost: CostModel, elem: int = 2, shards: int = 1) -> Callable[[int], RouterPlanner | None]:
    """bucket -> RouterPlanner with the cost-checked budgets for this context (None: all dense);
    shards > 1: ``routers`` are this rank's slice and the budgets its share."""

    def factory(bucket: int) -> RouterPlanner | None:
        budgets = plan_budgets(cfg, spec, bucket, context, cost, elem, shards)
        return None if is_dense(budgets) else RouterPlanner(routers, budgets)

    return factory
