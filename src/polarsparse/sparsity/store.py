"""On-disk activation data for router training: memory-mapped ``.npy`` arrays plus ``meta.json``.

Layout of a collection directory (T = token capacity, L layers, d hidden, I neurons)::

    meta.json            what was collected, from which model and text, and how far it got
    router_inputs.npy    float16 [T, L, d]      pre-attention normed hidden state (router input)
    mlp_active.npy       uint8   [T, L, ceil(I/8)]  active neurons, bit-packed (numpy bit order)
    head_norms.npy       float16 [T, L, Hq]     query-head contribution norms
    group_norms.npy      float16 [T, L, Hkv]    KV-group contribution norms

Tokens ``[0, train_tokens)`` come from training documents, ``[train_tokens, T)`` from held-out
documents (calibration and validation). ``meta["tokens_done"]`` counts rows written in order
(train part first), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polarsparse.errors import PolarsparseError

STORE_FORMAT = 1
ARRAYS = ("router_inputs", "mlp_active", "head_norms", "group_norms")


class StoreError(PolarsparseError, ValueError):
    """A collection directory is missing, incomplete or was made with different settings."""


@dataclass(frozen=True)
class Shapes:
    num_layers: int
    hidden: int
    neurons: int
    heads: int
    kv_heads: int

    def array_shapes(self, tokens: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {
            "router_inputs": ((tokens, self.num_layers, self.hidden), "float16"),
            "mlp_active": ((tokens, self.num_layers, (self.neurons + 7) // 8), "uint8"),
            "head_norms": ((tokens, self.num_layers, self.heads), "float16"),
            "group_norms": ((tokens, self.num_layers, self.kv_heads), "float16"),
        }


class ActivationStore:
    def __init__(self, path: Path, meta: dict, mode: str):
        self.path, self.meta = Path(path), meta
        self.shapes = Shapes(**meta["shapes"])
        self.arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode=mode) for name in ARRAYS}

    # -- creation / opening ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, meta: dict) -> "ActivationStore":
        """A new, empty store (meta must hold shapes, train_tokens, capacity)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": STORE_FORMAT, "tokens_done": 0, **meta}
        for name, (shape, dtype) in Shapes(**meta["shapes"]).array_shapes(meta["capacity"]).items():
            np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
        _write_json(path / "meta.json", meta)
        return cls(path, meta, "r+")

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "ActivationStore":
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise StoreError(f"{path} is not a router data directory (no meta.json); "
                             "make one with: polarsparse routers collect --out DIR")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: data format {meta.get('format')} is not {STORE_FORMAT}; collect again")
        missing = [n for n in ARRAYS if not (path / f"{n}.npy").is_file()]
        if missing:
            raise StoreError(f"{path}: missing {', '.join(missing)}; collect again with --overwrite")
        return cls(path, meta, "r+" if writable else "r")

    # -- writing --------------------------------------------------------------------------------
    @property
    def tokens_done(self) -> int:
        return int(self.meta["tokens_done"])

    @property
    def capacity(self) -> int:
        return int(self.meta["capacity"])

    @property
    def complete(self) -> bool:
        return self.tokens_done >= self.capacity

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Write the next rows of every array (same count each), flush, then record progress."""
        start = self.tokens_done
        n = min(len(rows["router_inputs"]), self.capacity - start)
        for name in ARRAYS:
            self.arrays[name][start:start + n] = rows[name][:n]
            self.arrays[name].flush()
        self.meta["tokens_done"] = start + n
        _write_json(self.path / "meta.json", self.meta)

    def update_meta(self, **fields) -> None:
        self.meta.update(fields)
        _write_json(self.path / "meta.json", self.meta)

    # -- reading --------------------------------------------------------------------------------
    def split(self, name: str) -> slice:
        """Rows of the "train" or "heldout" part that have been written."""
        cut = int(self.meta["train_tokens"])
        if name == "train":
            return slice(0, min(cut, self.tokens_done))
        return slice(cut, max(cut, self.tokens_done))

    def require_complete(self) -> None:
        if not self.complete:
            raise StoreError(f"{self.path}: collection stopped at {self.tokens_done}/{self.capacity} tokens; "
                             "run the same `polarsparse routers collect` command again to resume")

    def mlp_labels(self, rows: np.ndarray | slice, layers: slice | int = slice(None)) -> np.ndarray:
        """Unpacked active-neuron labels: bool [n, (L,) I]."""
        packed = self.arrays["mlp_active"][rows, layers]
        return np.unpackbits(packed, axis=-1, count=self.shapes.neurons).astype(bool)


def pack_bits(active: np.ndarray) -> np.ndarray:
    """bool [..., I] -> uint8 [..., ceil(I/8)] (numpy's big-endian bit order)."""
    return np.packbits(active, axis=-1)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
