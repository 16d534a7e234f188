"""OPT: LayerNorm, ReLU MLP with biases, MHA, learned positions (offset 2)."""
from __future__ import annotations

import torch
from torch import nn

from polarsparse.config import ModelConfig
from polarsparse.distributed.linear import VocabParallelEmbedding
from polarsparse.distributed.state import SINGLE, TensorParallel
from polarsparse.models.base import CausalLM, Recipe, attention_recipes, transpose
from polarsparse.models.layers import MLP, DecoderLayer, PagedAttention

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


class OPTForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        d, proj = cfg.hidden_size, cfg.word_embed_proj_dim or cfg.hidden_size
        affine = cfg.layer_norm_elementwise_affine
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj, tp)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = nn.Linear(proj, d, bias=False) if proj != d else None
        self.project_out = nn.Linear(d, proj, bias=False) if proj != d else None
        self.layers = nn.ModuleList(
            DecoderLayer(
                i,
                PagedAttention(cfg, bias=cfg.enable_bias, out_bias=cfg.enable_bias, rope=None, tp=tp),
                MLP(d, cfg.intermediate_size, "relu", cfg.enable_bias, cfg.enable_bias, tp),
                nn.LayerNorm(d, elementwise_affine=affine),
                nn.LayerNorm(d, elementwise_affine=affine),
                pre_norm=cfg.do_layer_norm_before,
            )
            for i in range(cfg.num_layers)
        )
        self.final_norm = nn.LayerNorm(d, elementwise_affine=affine) if cfg.do_layer_norm_before else None
        if not cfg.tie_word_embeddings:
            self.head = VocabParallelEmbedding(cfg.vocab_size, proj, tp)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def lm_head(self) -> VocabParallelEmbedding:
        return self.embed_tokens if self.cfg.tie_word_embeddings else self.head

    def global_recipes(self) -> dict[str, Recipe]:
        hf = "model.decoder."
        r = {
            "embed_tokens.weight": Recipe((hf + "embed_tokens.weight",), shard=0, pad=True),
            "embed_positions.weight": Recipe((hf + "embed_positions.weight",)),
        }
        if self.project_in is not None:
            r["project_in.weight"] = Recipe((hf + "project_in.weight",))
            r["project_out.weight"] = Recipe((hf + "project_out.weight",))
        if self.final_norm is not None and self.cfg.layer_norm_elementwise_affine:
            r.update(_norm_recipes("final_norm", hf + "final_layer_norm"))
        return r

    def layer_recipes(self, i: int) -> dict[str, Recipe]:
        hf, ours = f"model.decoder.layers.{i}.", f"layers.{i}."
        bias = self.cfg.enable_bias
        r = attention_recipes(ours, hf + "self_attn.", "out_proj", bias, bias)
        r[ours + "mlp.w1"] = Recipe((hf + "fc1.weight",), shard=0)
        r[ours + "mlp.w2t"] = Recipe((hf + "fc2.weight",), transpose, shard=1)
        if bias:
            r[ours + "mlp.b1"] = Recipe((hf + "fc1.bias",), shard=0)
            r[ours + "mlp.b2"] = Recipe((hf + "fc2.bias",))
        if self.cfg.layer_norm_elementwise_affine:
            r.update(_norm_recipes(ours + "norm1", hf + "self_attn_layer_norm"))
            r.update(_norm_recipes(ours + "norm2", hf + "final_layer_norm"))
        return r


def _norm_recipes(ours: str, theirs: str) -> dict[str, Recipe]:
    return {f"{ours}.weight": Recipe((f"{theirs}.weight",)), f"{ours}.bias": Recipe((f"{theirs}.bias",))}
