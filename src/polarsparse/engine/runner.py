"""Model runner: turns a scheduled batch into tensors, runs the model, returns logits.

Prefill/extend steps and (with ``static_decode`` off) decode steps build a fresh ForwardBatch and
run eagerly. With ``static_decode`` on (the default on CUDA unless ``EngineConfig.enforce_eager``)
decode steps run padded to a batch-size bucket on static buffers and are replayed from one CUDA
graph per (bucket, table width, dense/sparse): see :mod:`polarsparse.engine.cuda_graphs`.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from polarsparse.config import EngineConfig
from polarsparse.engine.cuda_graphs import DecodeGraphs, fuse_small_ops
from polarsparse.engine.kv_cache import NULL_BLOCK, KVCache, plan_num_blocks
from polarsparse.engine.scheduler import ScheduledBatch
from polarsparse.engine.sequence import Sequence
from polarsparse.models.base import CausalLM
from polarsparse.models.batch import ForwardBatch, PrefillLayout, SparsePlanner

log = logging.getLogger(__name__)

# Given a batch size (the live size on the eager path, the bucket on the static path), return the
# planner for a sparse decode step (None: run dense).
PlannerFactory = Callable[[int], "SparsePlanner | None"]


class ModelRunner:
    """static_decode: None = on for CUDA unless ecfg.enforce_eager. On CPU it can be switched on
    to run the padded static-buffer step eagerly (tests); graphs are captured only on CUDA."""

    def __init__(self, model: CausalLM, ecfg: EngineConfig, dtype: torch.dtype, device: torch.device,
                 static_decode: bool | None = None):
        self.model, self.cfg, self.ecfg = model, model.cfg, ecfg
        self.dtype, self.device = dtype, device
        tp, kv_heads = model.tp, model.layers[0].attn.num_kv_heads  # this rank's share
        num_blocks = plan_num_blocks(self.cfg, ecfg, dtype, device, kv_heads)
        if tp.size > 1:  # every rank must hold the same block ids: agree on the smallest cache
            agreed = torch.tensor([num_blocks], device=device)
            num_blocks = int(tp.all_reduce_min(agreed).item())
        self.cache = KVCache(self.cfg, num_blocks, ecfg.block_size, dtype, device, kv_heads)
        self._planner_factory: PlannerFactory | None = None
        self.graphs: DecodeGraphs | None = None
        if static_decode if static_decode is not None else (device.type == "cuda" and not ecfg.enforce_eager):
            self.use_static_decode()

    def use_static_decode(self, capture: bool = True, fuse: bool = True) -> DecodeGraphs:
        """Switch decode steps to padded static buffers (+ CUDA graphs on CUDA when ``capture``);
        ``fuse`` also compiles the small elementwise chains (CUDA only)."""
        if self.graphs is None:
            max_len = self.ecfg.max_model_len or self.cfg.max_model_len
            max_width = math.ceil(max_len / self.cache.block_size)
            capture = capture and self.device.type == "cuda"
            if capture and fuse:
                log.info("fused small ops: %s", ", ".join(fuse_small_ops(self.model)) or "none")
            self.graphs = DecodeGraphs(self.model, self.cache, self.ecfg.max_num_seqs, max_width,
                                       self._planner_for_bucket, capture)
        return self.graphs

    @property
    def planner_factory(self) -> PlannerFactory | None:
        return self._planner_factory

    @planner_factory.setter
    def planner_factory(self, factory: PlannerFactory | None) -> None:
        self._planner_factory = factory
        if self.graphs is not None:
            self.graphs.reset_sparse()

    def _planner_for_bucket(self, bucket: int) -> "SparsePlanner | None":
        return self._planner_factory(bucket) if self._planner_factory else None

    def release(self) -> None:
        """Free the KV cache and the captured graphs now (the runner cannot run afterwards);
        compiled-function caches may keep the model itself alive until the process ends."""
        self.cache.layers.clear()
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV block src to block dst in every layer, for each (src, dst) (forking a sequence
        that shares a partially filled block)."""
        for k, v in self.cache.layers:
            for src, dst in pairs:
                k[dst] = k[src]
                v[dst] = v[src]

    # -- public -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; returns logits [S, V] (fp32) for the S sequences that sample this step.

        On the static decode path the logits are a view of a buffer that the next step overwrites.
        """
        if batch.is_decode and self.graphs is not None and self.graphs.fits(batch.seqs):
            return self.graphs.run(batch.seqs)
        fb, rows = self.prepare(batch)
        hidden = self.model(fb, self.cache.layers)  # [N, d]
        return self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def prompt_logits(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Dense logits for every position of each sequence's tokens ([T_i, V] each).

        The sequences must own enough KV blocks (see Scheduler); used for scoring and tests.
        """
        batch = ScheduledBatch(seqs, False, [s.num_tokens for s in seqs])
        fb, _ = self.prepare(batch)
        logits = self.model.compute_logits(self.model(fb, self.cache.layers))
        return list(logits.split(batch.query_lens))

    # -- tensors ----------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple[ForwardBatch, torch.Tensor]:
        """Flatten the batch; returns the ForwardBatch and the rows whose logits are sampled."""
        ids, pos, slots, ctx, rows = [], [], [], [], []
        for i, (seq, q) in enumerate(zip(batch.seqs, batch.query_lens)):
            start = seq.num_tokens - 1 if batch.is_decode else seq.num_computed
            tokens = seq.tokens(start, start + q)
            ids += tokens
            pos += range(start, start + q)
            slots += [self._slot(seq, p) for p in range(start, start + q)]
            ctx.append(start + q)
            if batch.is_decode or batch.samples(i):
                rows.append(len(ids) - 1)
        dev = self.device
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        fb = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=positions,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=self._block_tables(batch.seqs),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            is_decode=batch.is_decode,
            query_lens=list(batch.query_lens),
        )
        if batch.is_decode:
            fb.sparse = self.planner_factory(len(batch.seqs)) if self.planner_factory else None
        else:
            fb.prefill_layout = PrefillLayout.build(fb.query_lens, positions, ctx)
        return fb, torch.tensor(rows, dtype=torch.long, device=dev)

    def _slot(self, seq: Sequence, position: int) -> int:
        bs = self.cache.block_size
        return seq.block_table[position // bs] * bs + position % bs

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        table = [s.block_table + [NULL_BLOCK] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(table, dtype=torch.int32, device=self.device)
