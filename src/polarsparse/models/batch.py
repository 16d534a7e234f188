"""What one forward step needs besides the weights: token layout, KV cache addressing, sparsity plan.

The engine builds a :class:`ForwardBatch`; the model reads it. Tokens of all sequences in a step are
flattened to ``N`` rows (vLLM style). A step is either *decode* (every sequence contributes exactly one
new token) or *prefill/extend* (each sequence contributes ``query_lens[b]`` tokens, possibly after a
cached prefix, which is how chunked prefill and preemption-recompute work).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class SparsePlanner(Protocol):
    """Decides, per layer, what a sparse decode step reads. Implemented in polarsparse.sparsity."""

    def plan(self, layer_idx: int, h: torch.Tensor, live: torch.Tensor | None = None) -> "LayerPlan":
        """h: [B, d] the pre-attention normed hidden state of layer ``layer_idx``; live: [B] bool,
        the rows that are real sequences (None: all; padding rows must not pick batch-wide units)."""
        ...


@dataclass
class LayerPlan:
    """head_idx: [B, k] KV-group indices to attend with (None: all heads).
    head_mask: [B, Hq] bool, query heads kept (reference path only; finer than KV groups, None: all).
    neuron_idx: [k] MLP neurons to compute for the whole batch (None: all neurons)."""

    head_idx: torch.Tensor | None = None
    head_mask: torch.Tensor | None = None
    neuron_idx: torch.Tensor | None = None
    neuron_stream: "torch.cuda.Stream | None" = None  # set when neuron_idx is computed on a side stream
    routed_from: torch.Tensor | None = None  # the side stream's input, kept alive until the join

    def neurons(self) -> torch.Tensor | None:
        """neuron_idx, once it is ready for the current stream: the MLP routing may run on a side
        stream beside attention (a planner forks it; the MLP joins it here). Until the join the plan
        holds the side stream's input, so the allocator cannot hand its memory to the main stream
        while the side stream still reads it."""
        if self.neuron_stream is not None:
            torch.cuda.current_stream(self.neuron_idx.device).wait_stream(self.neuron_stream)
            self.routed_from = None
        return self.neuron_idx


DENSE_PLAN = LayerPlan()


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [N] int64, KV cache slot = block * block_size + offset
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, tokens in cache after this step's writes
    is_decode: bool
    query_lens: list[int] | None = None  # prefill: tokens per sequence in this step (host list)
    sparse: SparsePlanner | None = None  # decode only; None means dense
    live: torch.Tensor | None = None  # [B] bool: real rows of a padded (static) decode step; None: all
    prefill_layout: "PrefillLayout | None" = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def plan(self, layer_idx: int, h: torch.Tensor) -> LayerPlan:
        if self.sparse is None:
            return DENSE_PLAN
        return self.sparse.plan(layer_idx, h, self.live)


@dataclass
class PrefillLayout:
    """Index maps between the flat token rows and a padded [B, Tq] grid, for prefill attention.

    flat_index: [B, Tq] int64, row of the flat batch for each padded query slot (padding points at the
      sequence's last real token so no row is fully masked; its result is discarded).
    valid: [B, Tq] bool, which padded slots are real tokens.
    q_positions: [B, Tq] int64 positions of the padded queries.
    """

    flat_index: torch.Tensor
    valid: torch.Tensor
    q_positions: torch.Tensor
    max_context: int

    @classmethod
    def build(cls, query_lens: list[int], positions: torch.Tensor, context_lens: list[int]) -> "PrefillLayout":
        device = positions.device
        b, tq = len(query_lens), max(query_lens)
        starts = torch.tensor([0] + query_lens[:-1], device=device).cumsum(0)  # [B]
        lens = torch.tensor(query_lens, device=device)
        offs = torch.arange(tq, device=device)[None, :]  # [1, Tq]
        valid = offs < lens[:, None]
        clamped = torch.minimum(offs, lens[:, None] - 1)
        flat_index = starts[:, None] + clamped  # [B, Tq]
        return cls(flat_index, valid, positions[flat_index], max(context_lens))
