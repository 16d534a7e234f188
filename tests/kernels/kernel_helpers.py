"""Shared helpers for the kernel tests (imported as a plain module).

On a CPU-only machine the Triton kernels run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) at tiny shapes; on a CUDA machine the same tests run compiled, and the
``gpu``-marked tests add real model shapes.
"""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# bf16 dots are wrong in the Triton interpreter (toolchain.md): bf16 runs only on the GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def tolerance(dtype: torch.dtype) -> dict:
    """assert_close tolerances for an fp32-accumulated result rounded to dtype."""
    return {
        torch.float32: {"atol": 1e-4, "rtol": 1e-4},
        torch.float16: {"atol": 2e-3, "rtol": 2e-3},
        torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
    }[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
