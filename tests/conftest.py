"""Test-wide setup.

TRITON_INTERPRET is read when a kernel is decorated (at import), so it is set here, before any
polarsparse.kernels module is imported: on a CPU-only machine every Triton kernel runs in the
interpreter; on a GPU machine the real compiler is used.
"""
import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a broken install
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
