"""Router bundles: a directory with ``routers.safetensors`` + ``manifest.json``.

The manifest records the format version, the model fingerprint (architecture config + every weight
shape), router dimensions, the calibrated top-k tables (MLP k per layer per batch-size bucket, head
importance per layer), how the routers were trained and their measured recall. See docs/routers.md.

Loading checks, in order: the manifest parses and its format version is not newer than ours; the
tensor file has the recorded size and SHA-256 (a truncated or edited file fails here); every tensor
the manifest implies is present; the fingerprint matches the model the bundle is attached to.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from polarsparse.errors import PolarsparseError
from polarsparse.sparsity.routers import HeadRouter, LayerRouters, MLPRouter

log = logging.getLogger(__name__)

FORMAT_NAME = "polarsparse-routers"
FORMAT_VERSION = 1
TENSORS_FILE = "routers.safetensors"
MANIFEST_FILE = "manifest.json"
HEAD_UNITS = ("kv", "query")
_IDENTITY_FIELDS = ("model_type", "family", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim", "activation")


class BundleError(PolarsparseError, ValueError):
    """A router bundle is missing, corrupt, too new, uncalibrated or made for another model."""


# ----------------------------------------------------------------------------------------------
# model identity
# ----------------------------------------------------------------------------------------------
def model_identity(model: nn.Module) -> dict:
    """Architecture fields + a SHA-256 fingerprint over them and every parameter's name and shape."""
    cfg = model.cfg
    arch = {k: getattr(cfg, k) for k in _IDENTITY_FIELDS}
    if getattr(model, "tp", None) is not None and model.tp.size > 1:  # identity = the unsharded model's
        from polarsparse.models.loader import build_model

        with torch.device("meta"):
            model = build_model(cfg)
    shapes = sorted((n, list(p.shape)) for n, p in model.named_parameters())
    digest = hashlib.sha256(json.dumps([arch, shapes], sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, **arch}


def tensor_name(layer: int, part: str) -> str:
    """part: "mlp" | "head_kv" | "head_query" -> prefix of that router's tensors."""
    return f"layers.{layer}.{part}"


# ----------------------------------------------------------------------------------------------
# the bundle
# ----------------------------------------------------------------------------------------------
@dataclass
class RouterBundle:
    manifest: dict
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    # -- identity and tables --------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    @property
    def calibration(self) -> dict:
        cal = self.manifest.get("calibration")
        if not cal:
            where = self.path or "this bundle"
            raise BundleError(f"{where} is not calibrated; run: polarsparse routers calibrate --routers {where} "
                              "--data DIR")
        return cal

    @property
    def defaults(self) -> dict:
        return self.manifest.get("defaults", {})

    def check_model(self, model: nn.Module) -> None:
        """Raise BundleError unless the bundle was built for a model with this architecture and weights."""
        ident, want = model_identity(model), self.manifest["model"]
        if ident["fingerprint"] == want.get("fingerprint"):
            return
        diffs = [f"{k}: bundle {want.get(k)} vs model {ident[k]}" for k in _IDENTITY_FIELDS if want.get(k) != ident[k]]
        detail = "; ".join(diffs) if diffs else "weight shapes differ"
        raise BundleError(
            f"router bundle {self.path or ''} was built for another model ({want.get('name', '?')}: {detail}); "
            "train routers for this model: polarsparse routers collect/train/calibrate --model ..."
        )

    # -- modules --------------------------------------------------------------------------------
    def layer_routers(self, head_unit: str = "kv", mlp: bool = True, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> nn.ModuleList:
        """One LayerRouters per layer, with the head router of ``head_unit`` ("kv" or "query")."""
        if head_unit not in HEAD_UNITS:
            raise BundleError(f"head_unit must be one of {HEAD_UNITS}, got {head_unit!r}")
        layers = []
        for i in range(self.num_layers):
            head = self._module(tensor_name(i, f"head_{head_unit}"), HeadRouter)
            layers.append(LayerRouters(head, self._module(tensor_name(i, "mlp"), MLPRouter) if mlp else None))
        return nn.ModuleList(layers).to(device=device, dtype=dtype).eval().requires_grad_(False)

    def _module(self, prefix: str, cls):
        state = {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}
        if not state:
            return None
        if cls is MLPRouter:
            rank, d = state["down.weight"].shape
            module = MLPRouter(d, rank, state["up.weight"].shape[0])
        else:
            module = HeadRouter(state["proj.weight"].shape[1], state["proj.weight"].shape[0])
        module.load_state_dict({k: v.float() for k, v in state.items()})
        return module

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: Path, dtype: torch.dtype = torch.float16) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.tensors.items()}
        tmp = path / (TENSORS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME})
        os.replace(tmp, path / TENSORS_FILE)
        os.chmod(path / TENSORS_FILE, 0o644)  # readable package data, whatever the writer's default
        self.manifest.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
        self.manifest["files"] = {TENSORS_FILE: _file_info(path / TENSORS_FILE)}
        self.manifest.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.save_manifest(path)
        self.path = path
        return path

    def save_manifest(self, path: Path | None = None) -> None:
        path = Path(path or self.path)
        tmp = path / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, path / MANIFEST_FILE)

    @classmethod
    def load(cls, path: str | Path) -> "RouterBundle":
        path = Path(path).expanduser()
        manifest = _read_manifest(path)
        info = manifest.get("files", {}).get(TENSORS_FILE)
        file = path / TENSORS_FILE
        if not file.is_file() or info is None:
            raise BundleError(f"{path}: {TENSORS_FILE} is missing")
        actual = _file_info(file)
        if actual != info:
            raise BundleError(f"{file} is truncated or modified ({actual['bytes']} bytes, expected {info['bytes']}; "
                              "checksum differs); copy the bundle again or retrain it")
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{file} cannot be read: {e}") from e
        bundle = cls(manifest, tensors, path)
        bundle._check_tensors()
        return bundle

    def _check_tensors(self) -> None:
        need = [tensor_name(i, "head_kv") + ".proj.weight" for i in range(self.num_layers)]
        missing = [n for n in need if n not in self.tensors]
        if missing:
            raise BundleError(f"{self.path}: {len(missing)} router tensors are missing (e.g. {missing[0]})")


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleError(f"router bundle not found: {path} (a directory with {MANIFEST_FILE} and {TENSORS_FILE})")
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is not a router bundle: {MANIFEST_FILE} is missing") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{file} is not valid JSON ({e.msg}); the bundle is corrupt") from None
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{file} is not a polarsparse router manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version} is newer than this polarsparse supports "
                          f"({FORMAT_VERSION}); upgrade polarsparse")
    return manifest


def _file_info(path: Path) -> dict:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
