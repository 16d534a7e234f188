"""LLaMA family: LLaMA-2/3/3.1, Mistral, Qwen2 (RMSNorm, RoPE, SwiGLU MLP, GQA)."""
from __future__ import annotations

from torch import nn

from polarsparse.config import ModelConfig
from polarsparse.distributed.linear import VocabParallelEmbedding
from polarsparse.distributed.state import SINGLE, TensorParallel
from polarsparse.models.base import CausalLM, Recipe, attention_recipes, cat_rows, transpose
from polarsparse.models.layers import MLP, DecoderLayer, PagedAttention, RMSNorm, RotaryEmbedding


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            DecoderLayer(
                i,
                PagedAttention(cfg, bias=cfg.attention_bias, out_bias=False, rope=rope, tp=tp),
                MLP(cfg.hidden_size, cfg.intermediate_size, "silu_gated", cfg.mlp_bias, cfg.mlp_bias, tp),
                RMSNorm(cfg.hidden_size, cfg.norm_eps),
                RMSNorm(cfg.hidden_size, cfg.norm_eps),
                pre_norm=True,
            )
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if not cfg.tie_word_embeddings:
            self.head = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def lm_head(self) -> VocabParallelEmbedding:
        return self.embed_tokens if self.cfg.tie_word_embeddings else self.head

    def global_recipes(self) -> dict[str, Recipe]:
        return {
            "embed_tokens.weight": Recipe(("model.embed_tokens.weight",), shard=0, pad=True),
            "norm.weight": Recipe(("model.norm.weight",)),
        }

    def layer_recipes(self, i: int) -> dict[str, Recipe]:
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        r = attention_recipes(ours, hf + "self_attn.", "o_proj", self.cfg.attention_bias, False)
        r.update({
            ours + "mlp.w1": Recipe((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), cat_rows, shard=0),
            ours + "mlp.w2t": Recipe((hf + "mlp.down_proj.weight",), transpose, shard=1),
            ours + "norm1.weight": Recipe((hf + "input_layernorm.weight",)),
            ours + "norm2.weight": Recipe((hf + "post_attention_layernorm.weight",)),
        })
        if self.cfg.mlp_bias:
            r[ours + "mlp.b1"] = Recipe((hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"), cat_rows, shard=0)
            r[ours + "mlp.b2"] = Recipe((hf + "mlp.down_proj.bias",))
        return r
