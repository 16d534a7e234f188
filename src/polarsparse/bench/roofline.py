"""Roofline helpers shared by the benchmarks: copy bandwidth, timing, byte counting.

Bandwidth figures follow the project's definition: bytes actually read and written by the
operation / its time / the measured device-to-device copy bandwidth (copy bytes read + written).
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024  # > 2x the L2 of any current datacenter GPU


# --------------------------------------------------------------------------- measurement
def measure_copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30,
                           reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), reps=reps, flush_l2=False, graph=False)
    return 2 * nbytes / seconds


class L2Flusher:
    """Reads a buffer larger than L2 so the next kernel starts with a cold cache.

    A read, not a memset: a memset leaves L2 full of dirty lines, and writing those back to
    memory would be billed to the timed kernel (up to L2-size bytes of extra traffic)."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.buf = torch.ones(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.sum()


def _capture(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture fn in a CUDA graph (after a warm-up on a side stream) -> replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_cuda(fn: Callable[[], object], reps: int = 50, warmup: int = 5, flush_l2: bool = True,
              graph: bool = True) -> float:
    """Median seconds of one call of fn, timed with CUDA events around each call.

    graph=True replays fn as a CUDA graph (no host launch overhead, as in the engine's decode
    step); flush_l2=True starts every timed call with a cold L2 so small working sets are not
    served from cache.
    """
    call = _capture(fn) if graph else fn
    flush = L2Flusher() if flush_l2 else (lambda: None)
    for _ in range(warmup):
        call()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def launch_floor(device: torch.device | str = "cuda", reps: int = 50) -> float:
    """Median seconds of a CUDA graph holding one tiny kernel, timed like everything else:
    the fixed cost under every graph-replay timing."""
    x = torch.zeros(1, device=device)
    return time_cuda(lambda: x.add_(1), reps=reps)


# --------------------------------------------------------------------------- byte counting
def decode_attention_bytes(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           context: int, kv_groups_read: int, elem_size: int) -> int:
    """Bytes a decode-attention step must move: K and V of the KV groups it reads
    (``kv_groups_read`` per sequence, each ``context`` tokens), q in, out written (all heads).
    """
    kv = 2 * batch * kv_groups_read * context * head_dim * elem_size
    q_read = batch * num_q_heads * head_dim * elem_size * kv_groups_read // num_kv_heads
    out_write = batch * num_q_heads * head_dim * elem_size
    return kv + q_read + out_write


def gather_gemm_bytes(batch: int, rows: int, row_len: int, in_len: int, out_len: int,
                      elem_size: int, bias_len: int = 0) -> int:
    """Bytes of y = x @ W[rows]^T style gather-GEMMs: ``rows`` weight rows of ``row_len``,
    the activations in ([batch, in_len]) and out ([batch, out_len]) and a bias of bias_len."""
    return (rows * row_len + batch * (in_len + out_len) + bias_len) * elem_size


def percent_of_bandwidth(nbytes: int, seconds: float, bandwidth: float) -> float:
    """100 * (bytes / seconds) / bandwidth."""
    return 100.0 * nbytes / seconds / bandwidth


def device_name(device: torch.device | str = "cuda") -> str:
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu"
