"""Load a model from a Hugging Face folder (config.json + *.safetensors, sharded or not) or the default.

Errors a user can cause (missing folder, unsupported architecture, missing or corrupt weights) raise
:class:`ModelLoadError` with a message that says what to do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from polarsparse.config import ConfigError, ModelConfig
from polarsparse.models.base import CausalLM, check_recipes
from polarsparse.errors import PolarsparseError
from polarsparse.models.embedded import DefaultModelError, prepare_default_model

log = logging.getLogger(__name__)

DEFAULT_ALIASES = ("default", "", None)


class ModelLoadError(PolarsparseError, RuntimeError):
    """The model folder cannot be loaded; the message says why and what to do."""


def resolve_model_path(model: str | Path | None) -> Path:
    """None / "default" -> the embedded model (converted on first use); else an existing HF folder."""
    if model in DEFAULT_ALIASES:
        try:
            return prepare_default_model()
        except DefaultModelError as e:
            raise ModelLoadError(str(e)) from e
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path} (give a local Hugging Face model folder)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder: config.json is missing")
    return path


def load_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
    try:
        return ModelConfig.from_hf(raw)
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from e


def build_model(cfg: ModelConfig) -> CausalLM:
    """An uninitialised model of the right family (weights on the meta device are not used here)."""
    if cfg.family == "opt":
        from polarsparse.models.opt import OPTForCausalLM

        return OPTForCausalLM(cfg)
    from polarsparse.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(cfg)


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Build the model for ``path``'s config and fill it from the safetensors checkpoint."""
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg)
    check_recipes(model)
    model = model.to_empty(device=device)
    _reset_buffers(model, cfg, device)
    with CheckpointReader(path) as reader:
        recipes = model.weight_recipes()
        for name, param in model.named_parameters():
            tensor = recipes[name].build([reader.get(src) for src in recipes[name].sources])
            if tensor.shape != param.shape:
                raise ModelLoadError(
                    f"{path}: weight {recipes[name].sources[0]} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
    model = model.to(dtype)
    _cast_buffers_fp32(model)
    model.eval().requires_grad_(False)
    return model


def _reset_buffers(model: CausalLM, cfg: ModelConfig, device: torch.device) -> None:
    """Non-persistent buffers (RoPE tables) were created on meta; rebuild them on ``device``."""
    from polarsparse.models.layers import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
            module.cos, module.sin = fresh.cos.to(device), fresh.sin.to(device)


def _cast_buffers_fp32(model: CausalLM) -> None:
    from polarsparse.models.layers import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cos, module.sin = module.cos.float(), module.sin.float()


class CheckpointReader:
    """Reads tensors by HF name from model.safetensors or a sharded checkpoint with an index file."""

    def __init__(self, path: Path):
        self.path = path
        self.files = self._locate(path)
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}

    @staticmethod
    def _locate(path: Path) -> list[Path]:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"corrupt shard index {index}: {e}") from e
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{path}: shard(s) listed in the index are missing: {', '.join(missing)}")
            return files
        files = sorted(path.glob("*.safetensors"))
        if not files:
            hint = " (PyTorch .bin checkpoints are not supported: convert to safetensors)" if any(
                path.glob("*.bin")
            ) else ""
            raise ModelLoadError(f"no *.safetensors weight files in {path}{hint}")
        return files

    def __enter__(self) -> "CheckpointReader":
        for f in self.files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"corrupt or unreadable weight file {f}: {e}") from e
            self._handles[f] = handle
            for key in handle.keys():
                self._where[key] = f
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        for candidate in _aliases(name):
            f = self._where.get(candidate)
            if f is not None:
                try:
                    return self._handles[f].get_tensor(candidate)
                except (SafetensorError, OSError, ValueError) as e:
                    raise ModelLoadError(f"corrupt tensor {candidate} in {f}: {e}") from e
        raise ModelLoadError(f"{self.path}: weight {name!r} is missing from the checkpoint")


def _aliases(name: str) -> list[str]:
    """Spellings of one tensor seen in real checkpoints (prefix variants, tied embeddings)."""
    out = [name]
    if name.startswith("model."):
        out.append(name[len("model."):])
    if name.endswith("embed_tokens.weight"):
        out.append("lm_head.weight")  # tied checkpoints sometimes keep only the head
    return out
