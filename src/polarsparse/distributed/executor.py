"""Tensor-parallel execution: rank 0 (the engine's process) drives ranks 1..N-1 (spawned workers).

Every rank holds its shard of the model and of the KV cache and runs the same ModelRunner. Rank 0
schedules, then broadcasts a picklable view of the step (token ids, positions, block tables) so all
ranks run the same forward, meeting in the all-reduces inside the layers; rank 0 samples. The server
stays one endpoint: only rank 0 talks to clients.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import multiprocessing as mp
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from polarsparse.distributed.state import TensorParallel, init_tensor_parallel
from polarsparse.errors import PolarsparseError

log = logging.getLogger(__name__)


class TensorParallelError(PolarsparseError, RuntimeError):
    """The tensor-parallel group could not be started or a worker failed."""


@dataclass
class SeqView:
    """What a runner reads of a Sequence for one step (picklable, and small: the tokens from the
    first one this step feeds, not the whole history; no generator, no sampling state)."""

    start: int  # index of window[0] in the sequence's tokens
    window: list[int]
    num_tokens: int
    num_computed: int
    block_table: list[int]

    @property
    def last_token(self) -> int:
        return self.window[-1]

    def tokens(self, start: int, end: int) -> list[int]:
        if start < self.start:
            raise ValueError(f"tokens from {start} were not sent (the view starts at {self.start})")
        return self.window[start - self.start : end - self.start]


def view_seq(s) -> SeqView:
    """The view of ``s`` for a step that feeds its tokens from ``num_computed`` on (a decode step:
    the last one)."""
    start = min(s.num_computed, s.num_tokens - 1)
    return SeqView(start, s.tokens(start, s.num_tokens), s.num_tokens, s.num_computed, list(s.block_table))


def view_of(batch):
    """A ScheduledBatch whose sequences are SeqViews (what workers receive)."""
    return dataclasses.replace(batch, seqs=[view_seq(s) for s in batch.seqs], preempted=[], finished=[])


class ParallelRunner:
    """Rank 0's runner under tensor parallelism: every call that runs the model is first broadcast,
    so all ranks run the same step; everything else reads through to rank 0's ModelRunner."""

    def __init__(self, runner, workers: "Workers"):
        self.__dict__.update(runner=runner, workers=workers)

    def execute(self, batch):
        self.workers.call("execute", view_of(batch))
        return self._guarded(self.runner.execute, batch)

    def copy_blocks(self, pairs):
        self.workers.call("copy_blocks", pairs)  # every rank holds its heads' share of each block
        return self._guarded(self.runner.copy_blocks, pairs)

    def prompt_logits(self, seqs):
        self.workers.call("prompt_logits", [view_seq(s) for s in seqs])
        return self._guarded(self.runner.prompt_logits, seqs)

    def _guarded(self, fn, arg):
        """A collective failing because a worker died becomes a TensorParallelError."""
        try:
            return fn(arg)
        except RuntimeError:
            self.workers.check_alive()
            raise

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def __setattr__(self, name: str, value) -> None:
        raise TensorParallelError(
            f"cannot change runner.{name} of a tensor-parallel engine at run time; pass routers/sparsity "
            "when the engine is created"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker builds its rank of the engine (picklable)."""

    model_path: str
    dtype: torch.dtype
    device: str
    engine_config: Any
    routers: Any
    sparsity: Any
    size: int
    init_method: str


class Workers:
    """Rank 0's handle on the other ranks."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, args=(rank, spec), daemon=True) for rank in range(1, spec.size)]
        self.group = None  # the group control messages travel on (TensorParallel.host_group once joined)
        for p in self.procs:
            p.start()
        atexit.register(self.shutdown)

    def call(self, method, *args) -> None:
        """Make every worker call ``runner.<method>(*args)``, or ``method(runner, *args)`` when
        ``method`` is a module-level function (rank 0 then makes the same call)."""
        self.check_alive()
        dist.broadcast_object_list([(method, args)], src=0, group=self.group)

    def shutdown(self) -> None:
        if not self.procs:
            return
        try:
            dist.broadcast_object_list([("exit", ())], src=0, group=self.group)
        except Exception:  # the group may already be broken; the processes are daemons
            pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self.procs = []
        if dist.is_initialized():  # rank 0 leaves too, so a later engine can form a new group
            gc.collect()  # CUDA graphs that captured NCCL calls must be gone, or destroying the communicator hangs
            dist.destroy_process_group()

    def check_alive(self) -> None:
        dead = [p.pid for p in self.procs if not p.is_alive()]
        if dead:
            raise TensorParallelError(f"tensor-parallel worker process(es) {dead} exited; restart the engine")


def start_rank0(size: int, spec_kwargs: dict) -> tuple[TensorParallel, Workers]:
    """Spawn ranks 1..size-1 and join the group as rank 0."""
    init_method = f"tcp://127.0.0.1:{free_port()}"
    spec = WorkerSpec(size=size, init_method=init_method, **spec_kwargs)
    workers = Workers(spec)
    try:
        tp = init_tensor_parallel(0, size, init_method, torch.device(spec.device))
    except Exception as e:
        workers.shutdown()
        raise TensorParallelError(f"could not start the tensor-parallel group: {e}") from e
    workers.group = tp.host_group
    return tp, workers


def _worker_main(rank: int, spec: WorkerSpec) -> None:
    """A worker: build this rank's runner, then run whatever rank 0 broadcasts until 'exit'."""
    from polarsparse.engine.engine import build_rank_runner

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.size))
    tp = init_tensor_parallel(rank, spec.size, spec.init_method, torch.device(spec.device))
    runner, _ = build_rank_runner(spec.model_path, spec.dtype, spec.device, spec.engine_config, spec.routers,
                               spec.sparsity, tp)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=tp.host_group)
        method, args = box[0]
        if method == "exit":
            break
        method(runner, *args) if callable(method) else getattr(runner, method)(*args)
    runner.release()  # its CUDA graphs hold the NCCL communicator: free them before destroying it
    del runner
    gc.collect()
    dist.destroy_process_group()
