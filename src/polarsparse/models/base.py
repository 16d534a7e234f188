"""The causal-LM skeleton shared by every family, and how HF checkpoint tensors map onto it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from polarsparse.config import ModelConfig
from polarsparse.distributed.linear import VocabParallelEmbedding
from polarsparse.models.batch import ForwardBatch
from polarsparse.models.layers import DecoderLayer


@dataclass(frozen=True)
class Recipe:
    """How one of our parameters is built from checkpoint tensors (e.g. q, k, v -> fused qkv).

    shard: under tensor parallelism, the dimension of each *source* tensor that is split over ranks
    (None: replicated). pad: the split rounds up and zero-pads (vocabulary rows).
    """

    sources: tuple[str, ...]
    combine: Callable[..., torch.Tensor] | None = None  # None: the single source as is
    shard: int | None = None
    pad: bool = False

    def build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.combine is None:
            return tensors[0]
        return self.combine(*tensors)


def cat_rows(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


class CausalLM(nn.Module):
    """embed -> decoder layers -> final norm -> logits. Families fill in embed / final / recipes."""

    cfg: ModelConfig
    layers: nn.ModuleList

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head(self) -> VocabParallelEmbedding:
        raise NotImplementedError

    def lm_head_weight(self) -> torch.Tensor:
        """This rank's LM-head rows [V / tp, d] (the embedding when tied)."""
        return self.lm_head().weight

    def weight_recipes(self) -> dict[str, Recipe]:
        """Our parameter name -> how to build it from the HF checkpoint's tensors."""
        r = self.global_recipes()
        if not self.cfg.tie_word_embeddings:
            r["head.weight"] = Recipe(("lm_head.weight",), shard=0, pad=True)
        for i in range(self.cfg.num_layers):
            r.update(self.layer_recipes(i))
        return r

    def global_recipes(self) -> dict[str, Recipe]:
        """Recipes of the parameters outside the decoder layers (embeddings, final norm)."""
        raise NotImplementedError

    def layer_recipes(self, i: int) -> dict[str, Recipe]:
        raise NotImplementedError

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Returns final hidden states [N, d] (before the LM head)."""
        x = self.embed(batch.input_ids, batch.positions)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, batch, kv)
        return self.final(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, d] -> logits [M, V] in fp32 (gathered over tensor-parallel ranks)."""
        return self.lm_head().logits(hidden).float()


def attention_recipes(ours: str, hf_attn: str, out_proj: str, qkv_bias: bool, out_bias: bool) -> dict[str, Recipe]:
    """Fused column-parallel qkv and row-parallel output projection of one layer.

    ours: our layer prefix ("layers.3."); hf_attn: the checkpoint's attention prefix; out_proj: its
    output projection's name ("o_proj" / "out_proj")."""
    qkv = tuple(f"{hf_attn}{p}_proj" for p in "qkv")
    r = {
        ours + "attn.qkv.weight": Recipe(tuple(f"{n}.weight" for n in qkv), cat_rows, shard=0),
        ours + "attn.o_proj.weight": Recipe((f"{hf_attn}{out_proj}.weight",), shard=1),
    }
    if qkv_bias:
        r[ours + "attn.qkv.bias"] = Recipe(tuple(f"{n}.bias" for n in qkv), cat_rows, shard=0)
    if out_bias:
        r[ours + "attn.o_proj.bias"] = Recipe((f"{hf_attn}{out_proj}.bias",))
    return r


def check_recipes(model: CausalLM) -> None:
    """Every parameter has exactly one recipe (a bug guard for new families)."""
    names = {n for n, _ in model.named_parameters()}
    recipes = set(model.weight_recipes())
    if names != recipes:
        raise AssertionError(f"recipes mismatch: missing {sorted(names - recipes)} extra {sorted(recipes - names)}")
