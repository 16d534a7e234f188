"""Tensor-parallel layers (Megatron style). Column-parallel layers are plain nn.Linear holding this
rank's output rows; the ones below need a collective."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polarsparse.distributed.state import SINGLE, TensorParallel


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b. W_local: [out, in / size]; the bias is replicated and
    added once, after the reduction."""

    def __init__(self, in_local: int, out: int, bias: bool, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out, in_local))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split over ranks: each rank looks up the ids it owns,
    zeros the rest, and the sum over ranks is the full lookup. weight: [ceil(V / size), d]."""

    def __init__(self, vocab: int, dim: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp, self.vocab = tp, vocab
        self.rows = tp.padded_split(vocab)
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [N] -> [N, d]."""
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: hidden [M, d] -> logits [M, V] gathered from every rank's vocabulary slice."""
        return self.tp.all_gather_last(hidden @ self.weight.t())[..., : self.vocab]
