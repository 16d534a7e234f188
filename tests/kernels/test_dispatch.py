"""polarsparse.kernels dispatch: device routing, the reference override, no-triton import."""
import os
import subprocess
import sys

import torch
from kernel_helpers import gpu_only

import polarsparse.kernels as K
from polarsparse.kernels import reference as ref


def test_cpu_tensors_use_the_reference():
    x = torch.randn(2, 16)
    w = torch.randn(32, 16)
    idx = torch.tensor([1, 5, 7])
    assert torch.equal(K.gather_fc1(x, w, None, idx, "relu"),
                       ref.gather_fc1(x, w, None, idx, "relu"))
    h = torch.randn(2, 3)
    assert torch.equal(K.gather_fc2(h, w, None, idx), ref.gather_fc2(h, w, None, idx))
    assert K.mlp_union_topk is ref.mlp_union_topk and K.head_topk is ref.head_topk


def test_import_without_triton_falls_back_to_reference():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, polarsparse.kernels as K\n"
            "assert not K.triton_available()\n"
            "x = torch.randn(2, 8); w = torch.randn(4, 8)\n"
            "print(K.gather_fc1(x, w, None, None, 'relu').shape)\n")
    env = dict(os.environ, POLARSPARSE_KERNELS="auto")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([2, 4])" in res.stdout


@gpu_only
def test_env_forces_reference_on_cuda(monkeypatch):
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    idx = torch.arange(0, 512, 4, device="cuda")
    monkeypatch.setenv("POLARSPARSE_KERNELS", "reference")
    assert torch.equal(K.gather_fc1(x, w, None, idx, "relu"),
                       ref.gather_fc1(x, w, None, idx, "relu"))
