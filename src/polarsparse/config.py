"""Configuration dataclasses: model architecture, sparsity, engine.

ModelConfig is parsed from a Hugging Face ``config.json`` dict by :func:`ModelConfig.from_hf`; it is the
only place that knows the many spellings HF uses for the same concept.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from polarsparse.errors import PolarsparseError


class ConfigError(PolarsparseError, ValueError):
    """A model or engine configuration that polarsparse cannot serve (message says why)."""


LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = ("opt",) + LLAMA_FAMILY


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model, normalised across families.

    family: "opt" (LayerNorm, ReLU MLP, learned positions) or "llama" (RMSNorm, RoPE, SwiGLU, GQA).
    """

    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    activation: str = "relu"  # "relu" (OPT) or "silu_gated" (LLaMA family)
    tie_word_embeddings: bool = False
    # LLaMA family
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    # token ids
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) the model can attend over."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Normalise a Hugging Face config.json dict; raise ConfigError for what we cannot serve."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise ConfigError(
                f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"polarsparse supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            if model_type == "opt":
                return cls._from_opt(cfg)
            return cls._from_llama(cfg, model_type)
        except KeyError as e:
            raise ConfigError(f"config.json for {model_type} is missing required field {e}") from None

    @classmethod
    def _from_opt(cls, cfg: dict[str, Any]) -> "ModelConfig":
        act = cfg.get("activation_function", "relu")
        if act != "relu":
            raise ConfigError(f"OPT with activation_function={act!r} is not supported (only relu)")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        proj = cfg.get("word_embed_proj_dim", hidden)
        return cls(
            model_type="opt",
            family="opt",
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["ffn_dim"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=1e-5,
            activation="relu",
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            do_layer_norm_before=cfg.get("do_layer_norm_before", True),
            word_embed_proj_dim=proj if proj != hidden else None,
            enable_bias=cfg.get("enable_bias", True),
            layer_norm_elementwise_affine=cfg.get("layer_norm_elementwise_affine", True),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=_dtype_name(cfg),
        )

    @classmethod
    def _from_llama(cls, cfg: dict[str, Any], model_type: str) -> "ModelConfig":
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{model_type} with hidden_act={act!r} is not supported (only silu)")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope_params(cfg)
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            family="llama",
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            activation="silu_gated",
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            mlp_bias=cfg.get("mlp_bias", False),
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=_dtype_name(cfg),
        )


def _as_ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _dtype_name(cfg: dict[str, Any]) -> str | None:
    return cfg.get("torch_dtype") or cfg.get("dtype")


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_params(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, scaling dict or None) from either HF spelling.

    transformers < 5 writes ``rope_theta`` + ``rope_scaling``; transformers >= 5 writes ``rope_parameters``.
    """
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    merged.pop("rope_theta", None)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope scaling type {rope_type!r} is not supported ({', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    merged["rope_type"] = rope_type
    merged.pop("type", None)
    return theta, merged


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> fp32 on CPU, bf16 on CUDA; otherwise a name from DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(set(DTYPES)))}") from None


@dataclass
class EngineConfig:
    """How the engine lays out memory and batches work."""

    block_size: int = 32  # KV tokens per paged block
    max_num_seqs: int = 256  # running sequences per step
    max_num_batched_tokens: int = 8192  # prompt tokens per prefill step (longer prompts are chunked)
    num_kv_blocks: int | None = None  # None: derive from kv_cache_memory
    kv_cache_memory: float = 0.9  # GPU: fraction of free memory; CPU: GiB
    max_model_len: int | None = None  # None: the model's context length
    enforce_eager: bool = False  # GPU: disable CUDA graphs (debugging)
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks sharing the model (rank 0 in this process, the rest spawned)

    def __post_init__(self) -> None:
        if self.block_size not in (16, 32, 64):
            raise ConfigError(f"block_size must be 16, 32 or 64, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")


HEAD_UNITS = ("kv", "query")
HEAD_BUDGETS = ("uniform", "importance")


@dataclass
class SparsityConfig:
    """Which parts of a decode step run sparse, and how much. None: the router bundle's default.

    head_density: fraction of head units kept per sequence (layer 0 is always dense).
    head_unit: "kv" (KV groups; what the GPU kernel serves) or "query" (query heads; reference path).
    head_budget: "uniform" (same k in every layer) or "importance" (per-layer k from head importance).
    mlp: use the MLP routers with the bundle's batch-size-aware top-k table.
    """

    enabled: bool = True
    attention: bool = True
    mlp: bool | None = None
    head_density: float | None = None
    head_unit: str | None = None
    head_budget: str | None = None
    mlp_density: float | None = None  # fixed MLP fraction instead of the calibrated table (experiments)
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    # Select top-k separately in N equal contiguous shards of the heads/neurons, k/N each: what a
    # tensor-parallel engine of size N does on each rank (set automatically under TP; settable at
    # TP=1 to reproduce TP's sparse semantics on one device).
    selection_shards: int = 1

    def __post_init__(self) -> None:
        for name in ("head_density", "mlp_density"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {v}")
        if self.head_unit not in (None, *HEAD_UNITS):
            raise ConfigError(f"head_unit must be one of {', '.join(HEAD_UNITS)}, got {self.head_unit!r}")
        if self.head_budget not in (None, *HEAD_BUDGETS):
            raise ConfigError(f"head_budget must be one of {', '.join(HEAD_BUDGETS)}, got {self.head_budget!r}")
