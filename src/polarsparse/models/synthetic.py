"""Real-shape models with random weights, for GPU benchmarks and tests (no checkpoint needed).

Checkpoints cannot travel to the benchmark machine, and decode speed depends on shapes and on how
many bytes a step reads, not on what the weights are. :data:`SYNTHETIC_CONFIGS` names the published
shapes of the supported families; :func:`random_model` builds one directly on the target device
(no fp32 staging copy) with the usual N(0, 0.02) initialisation, so activations and logits stay
finite and greedy decoding is deterministic.

A model *spec* ``synthetic:NAME[:layers=N][:positions=P][:seed=S]`` names the same shapes as a model
path: the loader reads it through :class:`polarsparse.models.synthetic_reader.SyntheticCheckpoint`,
so every tensor-parallel rank builds its own shard of one and the same random model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from polarsparse.config import ConfigError, ModelConfig
from polarsparse.models.base import CausalLM
from polarsparse.models.layers import RMSNorm

INIT_STD = 0.02  # transformers' initializer_range for every supported family


def _opt(d: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        model_type="opt", family="opt", vocab_size=50272, hidden_size=d, intermediate_size=4 * d,
        num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        max_position_embeddings=2048, activation="relu", tie_word_embeddings=True,
        bos_token_id=2, eos_token_ids=(2,), pad_token_id=1, torch_dtype="float16",
    )


def _llama(model_type: str, vocab: int, d: int, inter: int, layers: int, heads: int, kv_heads: int,
           max_pos: int, theta: float, eps: float, **extra) -> ModelConfig:
    return ModelConfig(
        model_type=model_type, family="llama", vocab_size=vocab, hidden_size=d,
        intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=d // heads, max_position_embeddings=max_pos, norm_eps=eps, activation="silu_gated",
        rope_theta=theta, torch_dtype="bfloat16", **extra,
    )


# Published shapes (Hugging Face config.json of each model). "tiny-*" are test shapes.
SYNTHETIC_CONFIGS: dict[str, ModelConfig] = {
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "llama-2-7b": _llama("llama", 32000, 4096, 11008, 32, 32, 32, 4096, 1e4, 1e-5,
                         bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-13b": _llama("llama", 32000, 5120, 13824, 40, 40, 40, 4096, 1e4, 1e-5,
                          bos_token_id=1, eos_token_ids=(2,)),
    "llama-3-8b": _llama("llama", 128256, 4096, 14336, 32, 32, 8, 8192, 5e5, 1e-5,
                         bos_token_id=128000, eos_token_ids=(128001,)),
    "mistral-7b": _llama("mistral", 32000, 4096, 14336, 32, 32, 8, 32768, 1e6, 1e-5,  # v0.2
                         bos_token_id=1, eos_token_ids=(2,)),
    # head dim 64: the smallest the GPU attention kernel serves
    "tiny-llama": _llama("llama", 512, 256, 512, 2, 4, 2, 1024, 1e4, 1e-5),
    "tiny-opt": dataclasses.replace(_opt(256, 2, 4), vocab_size=512, max_position_embeddings=1024),
}


def synthetic_config(name: str, num_layers: int | None = None,
                     max_position_embeddings: int | None = None) -> ModelConfig:
    """The named shape; optionally fewer layers (quick runs) or a longer position table.

    A longer position table changes no weight shape that a decode step reads (only the RoPE /
    learned-position table grows), so speed measured past the model's context is still the
    speed of that shape; results record when it was used.
    """
    try:
        cfg = SYNTHETIC_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown model config {name!r}; choose one of {', '.join(SYNTHETIC_CONFIGS)}") from None
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_layers:
            raise ConfigError(f"{name} has {cfg.num_layers} layers; cannot keep {num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    if max_position_embeddings is not None and max_position_embeddings > cfg.max_position_embeddings:
        cfg = dataclasses.replace(cfg, max_position_embeddings=max_position_embeddings)
    return cfg


SPEC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class SyntheticSpec:
    """A named shape with random weights, spelled like a model path (see the module docstring)."""

    name: str
    layers: int | None = None
    positions: int | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> "SyntheticSpec":
        """"synthetic:llama-2-13b:layers=4" -> SyntheticSpec; ConfigError if malformed or unknown."""
        if not is_synthetic(text):
            raise ConfigError(f"{text!r} is not a synthetic model spec ({SPEC_PREFIX}NAME[:layers=N][:seed=S])")
        name, *options = str(text)[len(SPEC_PREFIX):].split(":")
        fields = {}
        for opt in options:
            key, _, value = opt.partition("=")
            if key not in ("layers", "positions", "seed") or not value.isdigit():
                raise ConfigError(f"bad option {opt!r} in {text!r}: use layers=N, positions=P or seed=S")
            fields[key] = int(value)
        spec = cls(name, **fields)
        spec.config()  # validates the name and the layer count
        return spec

    def config(self) -> ModelConfig:
        return synthetic_config(self.name, self.layers, self.positions)

    def __str__(self) -> str:
        opts = [f"{k}={v}" for k, v in (("layers", self.layers), ("positions", self.positions)) if v is not None]
        opts += [f"seed={self.seed}"] if self.seed else []
        return ":".join([SPEC_PREFIX + self.name, *opts])


def is_synthetic(model) -> bool:
    """True for a ``synthetic:...`` model spec (a str or the Path made of one)."""
    return model is not None and str(model).startswith(SPEC_PREFIX)


def hf_config(cfg: ModelConfig):
    """The transformers config of the same architecture and shape."""
    import transformers as tf

    if cfg.family == "opt":
        return tf.OPTConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, ffn_dim=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            word_embed_proj_dim=cfg.word_embed_proj_dim or cfg.hidden_size,
            do_layer_norm_before=cfg.do_layer_norm_before, enable_bias=cfg.enable_bias,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    config_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[cfg.model_type]
    extra = {"sliding_window": None} if cfg.model_type != "llama" else {
        "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
    return config_cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, tie_word_embeddings=cfg.tie_word_embeddings, **extra,
    )


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> CausalLM:
    """Build ``cfg`` with random weights directly on ``device`` in ``dtype`` (eval mode, no grad)."""
    from polarsparse.models.loader import _reset_buffers, build_model

    device = torch.device(device)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device).to(dtype)
    _reset_buffers(model, cfg, device)  # RoPE tables: rebuilt in fp32 after the cast
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            _init_module(module, gen)
    return model.eval().requires_grad_(False)


def _init_module(module: nn.Module, gen: torch.Generator) -> None:
    """Norm scales 1, biases small, every matrix N(0, INIT_STD); only the module's own params."""
    for name, p in module.named_parameters(recurse=False):
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            p.fill_(1.0 if name == "weight" else 0.0)
        elif p.dim() == 1:
            p.normal_(0.0, INIT_STD / 4, generator=gen)
        else:
            p.normal_(0.0, INIT_STD, generator=gen)
