"""Launch-time helpers shared by the Triton kernels (host side only, no device sync)."""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

_INTERPRETER_SMS = 2


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a tiny number under the interpreter keeps the
    grids (and so the interpreted test time) small."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact IEEE dots (tf32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Split-K counters: one int32 per output tile, zero between launches (the program that merges a
# tile's splits resets its counter). Buffers are never freed, because a captured CUDA graph may
# still point at an old one after the buffer has grown.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []
_MIN_COUNTERS = 1 << 16


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """An int32 buffer of at least n zeros on device, shared by every split-K launch there.

    Allocated on first use; call the kernels once eagerly before capturing a CUDA graph (as the
    Triton compile needs anyway) so that it is not first allocated inside a capture. Launches
    that share it must be stream-ordered (one stream), as in the engine's decode step.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            log.warning("split-K counters first allocated inside a CUDA-graph capture; "
                        "run the kernels once eagerly before capturing")
        buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf
