"""The decode benchmark's ranks: one engine runner per tensor-parallel rank, driven in lockstep.

Every rank loads its shard of the same random model (a ``synthetic:`` spec, see
models/synthetic_reader.py) through the engine's own rank machinery: rank 0 is this process, ranks
1..N-1 are the engine's spawned workers (distributed/executor.py). Rank 0 schedules and samples;
engine steps reach the workers through ParallelRunner, and everything else the benchmark does on a
rank (random routers, sparse mode, KV fill, replaying the last step for timing) is a module-level
function below that :meth:`Ranks.everywhere` runs on every rank with the same arguments, so the
collectives inside each step (and inside its CUDA graph, captured on all ranks at the same step)
pair up. Rank 0 times; the others replay the same number of times.

Per-rank sparsity: each rank keeps its slice of one set of random routers (sparsity/sharding.py)
and the global top-k split evenly (decode_sparsity.requested_budgets with shards=N), costed on its
own share of the model; rank 0 measures the routing costs and sends the CostModel, so all ranks
decide alike.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch
from torch import nn

from polarsparse.bench.decode_sparsity import CostModel, SparsitySpec, planner_factory, random_routers
from polarsparse.config import EngineConfig
from polarsparse.distributed.executor import ParallelRunner, Workers, start_rank0
from polarsparse.distributed.state import SINGLE
from polarsparse.engine.engine import build_rank_runner
from polarsparse.engine.runner import ModelRunner
from polarsparse.sparsity.sharding import shard_layer_routers

log = logging.getLogger(__name__)

ROUTER_SEED = 1
REPLAY_WARMUP = 2  # untimed replays before the timed ones (time_cuda's warmup)

# This process's rank state (rank 0: the benchmark; a worker: itself): its routers by sparse-mode label.
_routers: dict[str, nn.ModuleList] = {}


# --------------------------------------------------------------------------- run on every rank
def prepare_rank(runner: ModelRunner, specs: list[SparsitySpec], eager: bool) -> None:
    """Static decode buffers (+ graphs unless eager), this rank's random routers, random KV."""
    runner.use_static_decode(capture=not eager, fuse=not eager)
    tp, cfg = runner.model.tp, runner.cfg
    _routers.clear()
    for spec in specs:
        full = random_routers(cfg, spec, runner.dtype, runner.device, seed=ROUTER_SEED)
        _routers[spec.label] = full if tp.size == 1 else shard_layer_routers(full, tp)
    for k, v in runner.cache.layers:  # decode speed does not depend on the cached values
        k.normal_()
        v.normal_()


def set_mode(runner: ModelRunner, spec: SparsitySpec | None, context: int, cost: CostModel | None) -> None:
    """Dense (spec None) or this rank's sparse planners for ``spec`` at ``context``."""
    if spec is None:
        runner.planner_factory = None
        return
    runner.planner_factory = planner_factory(runner.cfg, spec, _routers[spec.label], context, cost,
                                             shards=runner.model.tp.size)


def replay_last(runner: ModelRunner, n: int) -> None:
    """Replay the last decode step n times (a worker's share of rank 0's timing)."""
    for _ in range(n):
        runner.graphs.last_step()


def release_rank(runner: ModelRunner) -> None:
    runner.planner_factory = None
    _routers.clear()


# --------------------------------------------------------------------------- rank 0's handle
@dataclass
class Ranks:
    """Rank 0's runner (a ParallelRunner when size > 1), its local ModelRunner and the workers."""

    runner: ModelRunner | ParallelRunner
    local: ModelRunner
    workers: Workers | None
    size: int

    def everywhere(self, fn, *args):
        """fn(runner, *args) on every rank (workers first: they block until rank 0 gets there)."""
        if self.workers is not None:
            self.workers.call(fn, *args)
        return fn(self.local, *args)

    def routers(self, label: str) -> nn.ModuleList:
        """Rank 0's routers of a sparse mode (its slice under tensor parallelism)."""
        return _routers[label]

    def replay_on_workers(self, n: int) -> None:
        """Workers replay the last step n times while rank 0 times it (the calls must match)."""
        if self.workers is not None:
            self.workers.call(replay_last, n)

    def graphs_captured(self) -> tuple[int, int]:
        """(steps captured as CUDA graphs, steps built) on rank 0: the rest fell back to eager."""
        steps = list(self.local.graphs._steps.values())  # noqa: SLF001 - read-only look at what was built
        captured = sum(isinstance(getattr(s, "__self__", None), torch.cuda.CUDAGraph) for s in steps)
        return captured, len(steps)

    def close(self) -> None:
        """Free rank 0's KV cache and graphs (first: graphs that captured NCCL calls keep the
        communicator alive), then stop the workers and leave the group."""
        release_rank(self.local)
        self.local.release()
        self.runner = self.local = None
        gc.collect()  # graphs and fused methods hold cycles over the model and the KV cache
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def start_ranks(model_spec: str, dtype: torch.dtype, device: torch.device, ecfg: EngineConfig) -> Ranks:
    """Build every rank's runner of ``model_spec`` (dense; the benchmark sets sparse modes itself)."""
    size = ecfg.tensor_parallel_size
    if size == 1:
        runner, _ = build_rank_runner(model_spec, dtype, device, ecfg, None, None, SINGLE)
        return Ranks(runner, runner, None, 1)
    spec = dict(model_path=model_spec, dtype=dtype, device=device.type, engine_config=ecfg, routers=None,
                sparsity=None)
    tp, workers = start_rank0(size, spec)
    try:
        runner, _ = build_rank_runner(model_spec, dtype, device, ecfg, None, None, tp)
    except Exception:
        workers.shutdown()
        raise
    log.info("tensor parallel: %d ranks of %s", size, model_spec)
    return Ranks(ParallelRunner(runner, workers), runner, workers, size)
