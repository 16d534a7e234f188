"""Router modules: small predictors that read a layer's pre-attention normed hidden state.

MLP router: low-rank two-layer map d -> r -> I (logits of "neuron fires").
Head router: one linear layer d -> units, where a unit is a KV group (what the GPU kernel skips;
for MHA a group is one head) or a query head (finer, reference path only).
"""
from __future__ import annotations

import torch
from torch import nn


class MLPRouter(nn.Module):
    def __init__(self, d: int, rank: int, num_neurons: int):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, num_neurons, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, d] -> logits [B, I]."""
        return self.up(self.down(h))


class HeadRouter(nn.Module):
    def __init__(self, d: int, num_units: int):
        super().__init__()
        self.proj = nn.Linear(d, num_units, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, d] -> logits [B, units]."""
        return self.proj(h)


class LayerRouters(nn.Module):
    """The routers of one decoder layer (either may be absent: that part stays dense)."""

    def __init__(self, head: HeadRouter | None, mlp: MLPRouter | None):
        super().__init__()
        self.head, self.mlp = head, mlp
