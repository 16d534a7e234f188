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
    scores = torch.randn(3, 40)
    assert torch.equal(K.mlp_union_topk(scores, 7), ref.mlp_union_topk(scores, 7))
    assert torch.equal(K.head_topk(scores, 5), ref.head_topk(scores, 5))


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


def _paged_case(batch, hq, hkv, lens, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = 1 + sum(-(-n // bs) for n in lens)
    k = torch.randn(nb, hkv, bs, 64, generator=g)
    v = torch.randn(nb, hkv, bs, 64, generator=g)
    width = max(-(-n // bs) for n in lens)
    perm = torch.randperm(nb - 1, generator=g) + 1  # shuffled blocks, block 0 unused
    tables, at = torch.zeros(batch, width, dtype=torch.int32), 0
    for b, n in enumerate(lens):
        m = -(-n // bs)
        tables[b, :m] = perm[at : at + m]
        at += m
    q = torch.randn(batch, hq, 64, generator=g)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


def test_cpu_decode_attention_fast_path_matches_reference():
    for hq, hkv in ((4, 4), (8, 2)):
        q, k, v, bt, cl = _paged_case(3, hq, hkv, [5, 40, 17])
        for head_idx in (None, torch.tensor([[0], [1], [0]])):
            got = K.paged_decode_attention(q, k, v, bt, cl, 0.125, head_idx)
            want = ref.paged_decode_attention(q, k, v, bt, cl, 0.125, head_idx)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if head_idx is not None:
                assert (got[0, hq // hkv:] == 0).all()  # sequence 0 kept only group 0


def test_env_forces_the_reference_on_cpu(monkeypatch):
    q, k, v, bt, cl = _paged_case(2, 4, 2, [9, 20])
    monkeypatch.setenv("POLARSPARSE_KERNELS", "reference")
    calls = []
    monkeypatch.setattr(ref, "paged_decode_attention", lambda *a, **kw: calls.append(1) or torch.zeros(2, 4, 64))
    K.paged_decode_attention(q, k, v, bt, cl, 0.125)
    assert calls == [1]
