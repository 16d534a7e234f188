"""Sparsity-aware kernels: dispatch by device.

``paged_decode_attention``, ``gather_fc1``, ``gather_fc2``, ``mlp_union_topk`` and ``head_topk``
use the Triton kernels when their tensors live on CUDA and Triton imports, else the pure-torch
reference (``reference.py``, the ground truth of the semantics); on CPU, decode attention takes the
single-SDPA fast path in ``torch_paged.py``. The two top-k selections (``select.py``) return
exactly the reference's indices (ties -> lower index), so the dispatch never changes a plan.
``POLARSPARSE_KERNELS=reference`` forces the reference everywhere. Importing this package never
requires Triton.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

from . import reference
from .torch_paged import sdpa_paged_decode_attention

log = logging.getLogger(__name__)

__all__ = ["paged_decode_attention", "gather_fc1", "gather_fc2", "mlp_union_topk", "head_topk", "write_kv",
           "triton_available", "reference"]

_MODULES: dict[str, ModuleType | None] = {}


def _triton_module(name: str) -> ModuleType | None:
    """polarsparse.kernels.<name> if Triton imports, else None (logged once)."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:  # triton missing or broken: the reference still works
            log.info("Triton kernels unavailable (%s); using the torch reference", exc)
            _MODULES[name] = None
    return _MODULES[name]


def triton_available() -> bool:
    return _triton_module("attention") is not None and _triton_module("mlp") is not None


def _use_triton(t: torch.Tensor) -> bool:
    return (t.is_cuda and os.environ.get("POLARSPARSE_KERNELS", "auto") != "reference"
            and triton_available())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           head_idx: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D], paged k/v [NB, Hkv, bs, D], head_idx None | [B, k] -> [B, Hq, D]."""
    if _use_triton(q):
        return _triton_module("attention").triton_paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, head_idx)
    if not q.is_cuda and os.environ.get("POLARSPARSE_KERNELS", "auto") != "reference":
        return sdpa_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, head_idx)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                            scale, head_idx)


def gather_fc1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               idx: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x [B, d], w [I, d] (relu) or [2I, d] (silu_gated), idx [k] | None -> h [B, k]."""
    if _use_triton(x):
        return _triton_module("mlp").gather_fc1(x, w, b, idx, activation)
    return reference.gather_fc1(x, w, b, idx, activation)


def gather_fc2(h: torch.Tensor, w2t: torch.Tensor, b2: torch.Tensor | None,
               idx: torch.Tensor | None) -> torch.Tensor:
    """h [B, k], w2t [I, d], idx [k] | None -> y [B, d]."""
    if _use_triton(h):
        return _triton_module("mlp").gather_fc2(h, w2t, b2, idx)
    return reference.gather_fc2(h, w2t, b2, idx)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v [N, Hkv, D] in the paged caches [NB, Hkv, bs, D] at slot_mapping [N] (one launch on CUDA)."""
    if _use_triton(k) and _triton_module("kv_write") is not None:
        return _triton_module("kv_write").write_kv(k_cache, v_cache, slot_mapping, k, v)
    return reference.write_kv(k_cache, v_cache, slot_mapping, k, v)


def mlp_union_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, I] -> int64 [k]: top-k of the batch max per neuron, sorted ascending."""
    if _use_triton(scores) and _triton_module("select") is not None:
        return _triton_module("select").union_topk(scores, k)
    return reference.mlp_union_topk(scores, k)


def head_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, U] -> int64 [B, k]: per-row top-k unit indices, sorted ascending."""
    if _use_triton(scores) and _triton_module("select") is not None:
        return _triton_module("select").head_topk(scores, k)
    return reference.head_topk(scores, k)
