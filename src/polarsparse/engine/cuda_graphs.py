"""Decode steps on static buffers: padded to a batch-size bucket, captured once, replayed.

A CUDA graph replays fixed addresses and shapes, so a decode step reads its inputs from static
buffers sized for the largest bucket: ``input_ids / positions / slot_mapping / context_lens
[max_batch]`` and one ``block_tables [max_batch, width]`` per table width. A batch of n live
sequences runs as the smallest bucket >= n; rows n..bucket-1 are padding that points at the NULL
block (token 0, position 0, context 1, K/V written to the scratch slot), so they never read or
write a live sequence's cache, and a ``live`` row mask keeps them out of batch-wide choices (the
MLP union top-k).

Steps are keyed by (bucket, width, sparse). The width, a power-of-two number of KV blocks that
covers the longest sequence, fixes the attention kernel's split plan (it depends on the table
width, never on context values); a sparse step captures its bucket's planner (routers, top-k)
inside the graph, so the whole step, routers included, is one replay with no host sync.
On CPU, or with capture off, the same padded step runs eagerly: that is how the padding logic is
tested without a GPU.
"""
from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from polarsparse.engine.kv_cache import NULL_BLOCK, KVCache
from polarsparse.engine.sequence import Sequence
from polarsparse.models.base import CausalLM
from polarsparse.models.batch import ForwardBatch, SparsePlanner
from polarsparse.sparsity.planner import BATCH_BUCKETS, bucket_for

log = logging.getLogger(__name__)

MIN_WIDTH_TOKENS = 512  # the narrowest block table a step is captured with


@dataclass(frozen=True)
class StepKey:
    bucket: int  # padded batch size
    width: int  # block-table columns
    sparse: bool


def width_for(num_blocks: int, block_size: int, max_width: int) -> int:
    """Table width for a batch whose longest sequence owns ``num_blocks`` blocks: the next power of
    two (at least MIN_WIDTH_TOKENS worth of blocks), capped at ``max_width``."""
    floor = math.ceil(MIN_WIDTH_TOKENS / block_size)
    return min(max_width, max(floor, 1 << max(0, num_blocks - 1).bit_length()))


class StaticInputs:
    """Device buffers the captured steps read, and the host staging that fills them.

    Padding rows keep token 0, position 0, slot NULL_BLOCK * block_size, context 1 and a table of
    NULL blocks: attention reads only the scratch slot they wrote themselves.
    """

    def __init__(self, max_batch: int, max_width: int, block_size: int, device: torch.device):
        self.max_batch, self.max_width, self.block_size, self.device = max_batch, max_width, block_size, device
        pin = device.type == "cuda"

        def host(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        # host staging: ids, positions, slots (int64), context lens (int32), flat block table (int32)
        self._h_rows = host(3, max_batch)
        self._h_ctx = host(max_batch, dtype=torch.int32)
        self._h_table = host(max_batch * max_width, dtype=torch.int32)
        self.rows = torch.zeros(3, max_batch, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self._h_live = host(max_batch, dtype=torch.bool)
        self.live = torch.zeros(max_batch, dtype=torch.bool, device=device)  # real rows of the step
        self._tables: dict[int, torch.Tensor] = {}

    def table(self, width: int) -> torch.Tensor:
        """[max_batch, width] int32 device table (all NULL until loaded)."""
        if width not in self._tables:
            self._tables[width] = torch.full((self.max_batch, width), NULL_BLOCK, dtype=torch.int32, device=self.device)
        return self._tables[width]

    def load(self, seqs: list[Sequence], bucket: int, width: int) -> None:
        """Write the live rows and the padding rows of one decode step into the device buffers."""
        bs = self.block_size
        rows, ctx = self._h_rows.numpy(), self._h_ctx.numpy()
        table = self._h_table[: bucket * width].view(bucket, width).numpy()
        rows[:, :bucket] = 0
        rows[2, :bucket] = NULL_BLOCK * bs
        ctx[:bucket] = 1
        table.fill(NULL_BLOCK)
        for i, seq in enumerate(seqs):
            pos = seq.num_tokens - 1
            blocks = seq.block_table
            rows[0, i], rows[1, i], ctx[i] = seq.last_token, pos, pos + 1
            rows[2, i] = blocks[pos // bs] * bs + pos % bs
            table[i, : len(blocks)] = blocks
        live = self._h_live.numpy()
        live[:bucket] = False
        live[: len(seqs)] = True
        self.live[:bucket].copy_(self._h_live[:bucket])
        self.rows[:, :bucket].copy_(self._h_rows[:, :bucket])
        self.context_lens[:bucket].copy_(self._h_ctx[:bucket])
        self.table(width)[:bucket].copy_(self._h_table[: bucket * width].view(bucket, width))

    def forward_batch(self, bucket: int, width: int, planner: SparsePlanner | None) -> ForwardBatch:
        """A decode ForwardBatch of views into the static buffers (what a graph captures)."""
        return ForwardBatch(
            input_ids=self.rows[0, :bucket], positions=self.rows[1, :bucket],
            slot_mapping=self.rows[2, :bucket], block_tables=self.table(width)[:bucket],
            context_lens=self.context_lens[:bucket], is_decode=True, sparse=planner, live=self.live[:bucket],
        )


class DecodeGraphs:
    """Padded decode steps over static inputs; one CUDA graph per StepKey (captured on first use).

    planner_for(bucket) returns the bucket's SparsePlanner, or None for a dense step; it is asked
    once per bucket until :meth:`reset_sparse`. ``capture=False`` runs the same steps eagerly.
    """

    def __init__(self, model: CausalLM, cache: KVCache, max_batch: int, max_width: int,
                 planner_for: Callable[[int], SparsePlanner | None], capture: bool):
        self.model, self.cache, self.planner_for = model, cache, planner_for
        self.device = cache.layers[0][0].device
        self.capture = capture and self.device.type == "cuda"
        self.buckets = tuple(b for b in BATCH_BUCKETS if b <= bucket_for(max_batch))
        self.max_width = max_width
        self.inputs = StaticInputs(self.buckets[-1], max_width, cache.block_size, self.device)
        vocab = model.cfg.vocab_size  # logits are gathered over tensor-parallel ranks: the whole vocabulary
        self.logits = torch.zeros(self.buckets[-1], vocab, dtype=torch.float32, device=self.device)  # [max_batch, V]
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._steps: dict[StepKey, Callable[[], None]] = {}
        self._planners: dict[int, SparsePlanner | None] = {}
        self.last_step: Callable[[], None] | None = None

    # -- public -----------------------------------------------------------------------------
    def fits(self, seqs: list[Sequence]) -> bool:
        return len(seqs) <= self.buckets[-1] and max(len(s.block_table) for s in seqs) <= self.max_width

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decode step for ``seqs`` -> logits [n, V] fp32 (a view, valid until the next step)."""
        bucket = bucket_for(len(seqs), self.buckets)
        width = width_for(max(len(s.block_table) for s in seqs), self.cache.block_size, self.max_width)
        self.inputs.load(seqs, bucket, width)
        step = self.step(bucket, width)
        step()
        self.last_step = step
        return self.logits[: len(seqs)]

    def step(self, bucket: int, width: int) -> Callable[[], None]:
        """The (captured, on first use) step for a bucket and width under the current planner."""
        planner = self._planner(bucket)
        key = StepKey(bucket, width, planner is not None)
        if key not in self._steps:
            self._steps[key] = self._build(key, planner)
        return self._steps[key]

    def capture_all(self, width: int, sparse: bool = False, progress: bool = True) -> None:
        """Capture every bucket's step at ``width`` ahead of time (largest first, so the graphs
        share one memory pool), on all-padding inputs."""
        for bucket in tqdm(sorted(self.buckets, reverse=True), desc=f"capture {'sparse' if sparse else 'dense'} decode",
                           disable=not progress, unit="graph"):
            if sparse and self._planner(bucket) is None:
                continue
            self.inputs.load([], bucket, width)
            self.step(bucket, width)

    def reset_sparse(self) -> None:
        """Forget sparse steps and planners (the planner factory changed)."""
        self._planners.clear()
        self._steps = {k: v for k, v in self._steps.items() if not k.sparse}
        self.last_step = None

    @property
    def num_captured(self) -> int:
        return len(self._steps)

    # -- building ---------------------------------------------------------------------------
    def _planner(self, bucket: int) -> SparsePlanner | None:
        if bucket not in self._planners:
            self._planners[bucket] = self.planner_for(bucket)
        return self._planners[bucket]

    def _build(self, key: StepKey, planner: SparsePlanner | None) -> Callable[[], None]:
        fb = self.inputs.forward_batch(key.bucket, key.width, planner)
        out = self.logits[: key.bucket]

        def eager_step() -> None:
            hidden = self.model(fb, self.cache.layers)  # [bucket, d]
            out.copy_(self.model.compute_logits(hidden))

        if not self.capture:
            return eager_step
        try:
            graph = self._capture(eager_step)
        except RuntimeError as exc:  # keep serving: this key runs eagerly
            log.warning("CUDA-graph capture failed for %s (%s); running it eagerly", key, exc)
            torch.cuda.synchronize(self.device)
            return eager_step
        log.debug("captured decode step %s", key)
        return graph.replay

    def _capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture.

        Under tensor parallelism every rank captures the same step at the same time (collectives
        inside); host barriers keep any rank from launching NCCL kernels (warm-up or replay) while
        another one is capturing, which can deadlock."""
        tp = self.model.tp
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if tp.size > 1:
            torch.cuda.synchronize(self.device)
            tp.host_barrier()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                step()
        finally:
            tp.host_barrier()
        return graph


# ----------------------------------------------------------------------------------------------
# Fewer graph nodes: compile the elementwise chains that run as many tiny kernels
# ----------------------------------------------------------------------------------------------
def fuse_small_ops(model: CausalLM) -> list[str]:
    """Replace RMSNorm/LayerNorm.forward, RotaryEmbedding.forward and the gated MLP.activate of ``model``'s
    modules by one torch.compile'd function per method (dynamic shapes, shared by every instance).

    In a decode step these chains are ~30 tiny kernels per layer (an RMSNorm alone is 8) whose
    launch gaps cost more than their bytes; compiled, each is one or two kernels. Each method is
    checked once against eager on a small input; one that fails to compile or disagrees stays
    eager. Returns the fused method names.
    """
    from polarsparse.models.layers import MLP, RMSNorm, RotaryEmbedding

    dtype = model.lm_head_weight().dtype
    targets = (
        (RMSNorm, "forward", lambda m: True),
        # torch's LayerNorm kernel spends ~8 us on one 4096-wide row (one block); compiled: ~2 us
        (nn.LayerNorm, "forward", lambda m: m.weight is not None),
        (RotaryEmbedding, "forward", lambda m: True),
        (MLP, "activate", lambda m: m.activation == "silu_gated"),  # relu is one kernel already
    )
    fused = []
    for cls, name, wanted in targets:
        instances = [m for m in model.modules() if type(m) is cls and wanted(m)]
        if not instances:
            continue
        eager = getattr(cls, name)
        # not fullgraph: past dynamo's recompile limit (many models in one process) a call runs eagerly
        compiled = torch.compile(eager, dynamic=True)
        if not _agrees(compiled, eager, instances[0], dtype):
            continue
        for m in instances:
            setattr(m, name, types.MethodType(compiled, m))
        fused.append(f"{cls.__name__}.{name}")
    return fused


def fused_method_names(model: nn.Module) -> list[str]:
    """The methods fuse_small_ops replaced on ``model``'s modules."""
    return sorted({f"{type(m).__name__}.{name}" for m in model.modules()
                   for name in ("forward", "activate") if name in vars(m)})


def _agrees(compiled, eager, module: nn.Module, dtype: torch.dtype) -> bool:
    """Run both on a 2-row example of the module's real width; False (logged) on any failure."""
    try:
        args = _example_args(module, dtype)
        with torch.inference_mode():
            got, want = compiled(module, *args), eager(module, *args)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        return True
    except Exception as exc:  # noqa: BLE001 - any compile failure leaves the module eager
        log.warning("not fusing %s (%s: %s)", type(module).__name__, type(exc).__name__, exc)
        return False


def _example_args(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    from polarsparse.models.layers import MLP, RMSNorm

    if isinstance(module, (RMSNorm, nn.LayerNorm)):
        return (torch.randn(2, module.weight.shape[0], dtype=dtype, device=module.weight.device),)
    if isinstance(module, MLP):
        return (torch.randn(2, module.w1.shape[0], dtype=dtype, device=module.w1.device),)
    # RotaryEmbedding: positions [N], q [N, Hq, D], k [N, Hkv, D]
    dim, dev = module.cos.shape[1], module.cos.device
    pos = torch.tensor([0, 1], device=dev)
    return pos, torch.randn(2, 4, dim, dtype=dtype, device=dev), torch.randn(2, 2, dim, dtype=dtype, device=dev)
