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
from polarsparse.distributed.state import SINGLE, TensorParallel
from polarsparse.models.base import CausalLM, check_recipes
from polarsparse.errors import PolarsparseError
from polarsparse.models.embedded import DefaultModelError, prepare_default_model
from polarsparse.models.synthetic import SyntheticSpec, is_synthetic

log = logging.getLogger(__name__)

DEFAULT_ALIASES = ("default", "", None)


class ModelLoadError(PolarsparseError, RuntimeError):
    """The model folder cannot be loaded; the message says why and what to do."""


def resolve_model_path(model: str | Path | None) -> Path:
    """None / "default" -> the embedded model (converted on first use); "synthetic:NAME[:layers=N]" ->
    that random-weight shape (kept as a pseudo-path); else an existing HF folder."""
    if is_synthetic(model):
        try:
            return Path(str(SyntheticSpec.parse(str(model))))
        except ConfigError as e:
            raise ModelLoadError(str(e)) from e
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
    if is_synthetic(path):
        return SyntheticSpec.parse(str(path)).config()
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
    try:
        return ModelConfig.from_hf(raw)
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from e


def build_model(cfg: ModelConfig, tp: TensorParallel = SINGLE) -> CausalLM:
    """An uninitialised model of the right family for this tensor-parallel rank."""
    if cfg.family == "opt":
        from polarsparse.models.opt import OPTForCausalLM

        return OPTForCausalLM(cfg, tp)
    from polarsparse.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(cfg, tp)


def check_shardable(path: Path, size: int) -> None:
    """Raise ModelLoadError now if the model cannot be split over ``size`` ranks (before any spawn)."""
    cfg = load_config(path)
    try:
        with torch.device("meta"):
            build_model(cfg, TensorParallel(0, size))
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from e


def load_model(path: Path, dtype: torch.dtype, device: torch.device, tp: TensorParallel = SINGLE) -> CausalLM:
    """Build the model for ``path``'s config and fill it from the safetensors checkpoint.

    Under tensor parallelism each rank reads only its slices of the sharded tensors.
    """
    cfg = load_config(path)
    try:
        with torch.device("meta"):
            model = build_model(cfg, tp)
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    check_recipes(model)
    model = model.to_empty(device=device).to(dtype)  # no fp32 staging copy of a large model
    _reset_buffers(model, cfg, device)
    with open_checkpoint(path, dtype, device) as reader:
        recipes = model.weight_recipes()
        for name, param in model.named_parameters():
            recipe = recipes[name]
            tensor = recipe.build([reader.get(src, recipe.shard, recipe.pad, tp) for src in recipe.sources])
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


def open_checkpoint(path: Path, dtype: torch.dtype, device: torch.device):
    """The reader of ``path``'s tensors: its safetensors files, or random ones for a synthetic spec."""
    if is_synthetic(path):
        from polarsparse.models.synthetic_reader import SyntheticCheckpoint

        return SyntheticCheckpoint(SyntheticSpec.parse(str(path)), dtype, device)
    return CheckpointReader(path)


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

    def get(self, name: str, shard: int | None = None, pad: bool = False, tp: TensorParallel = SINGLE) -> torch.Tensor:
        """The tensor ``name``, or only this rank's slice of it along dim ``shard``."""
        for candidate in _aliases(name):
            f = self._where.get(candidate)
            if f is not None:
                try:
                    if shard is None or tp.size == 1:
                        return self._handles[f].get_tensor(candidate)
                    return _read_shard(self._handles[f].get_slice(candidate), shard, pad, tp)
                except (SafetensorError, OSError, ValueError) as e:
                    raise ModelLoadError(f"corrupt tensor {candidate} in {f}: {e}") from e
        raise ModelLoadError(f"{self.path}: weight {name!r} is missing from the checkpoint")


def _read_shard(view, dim: int, pad: bool, tp: TensorParallel) -> torch.Tensor:
    """Read rows [rank * n, (rank + 1) * n) along ``dim`` without loading the rest of the tensor."""
    size = view.get_shape()[dim]
    per = tp.padded_split(size) if pad else tp.split(size, f"dimension {dim} of a weight")
    start, stop = min(tp.rank * per, size), min((tp.rank + 1) * per, size)
    index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(view.get_shape())))
    part = view[index]
    if part.shape[dim] < per:  # the last rank's vocabulary padding
        shape = list(part.shape)
        shape[dim] = per - part.shape[dim]
        part = torch.cat([part, part.new_zeros(shape)], dim=dim)
    return part


def _aliases(name: str) -> list[str]:
    """Spellings of one tensor seen in real checkpoints (prefix variants, tied embeddings)."""
    out = [name]
    if name.startswith("model."):
        out.append(name[len("model."):])
    if name.endswith("embed_tokens.weight"):
        out.append("lm_head.weight")  # tied checkpoints sometimes keep only the head
    return out
