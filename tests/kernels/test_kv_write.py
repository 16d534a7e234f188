"""Paged KV write: the Triton kernel stores exactly what the reference stores, and nothing else."""
import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, gpu_only, needs_triton

from polarsparse.kernels import reference as ref


def make_case(n, heads_q, heads_kv, dim, block_size, num_blocks, dtype, cache_dtype, device, seed=0):
    """K/V as views of a fused qkv output (strided rows, like the model's), a random cache and
    distinct random slots (never the NULL block 0)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (heads_q + 2 * heads_kv) * dim, generator=gen).to(device=device, dtype=dtype)
    _, k, v = qkv.split((heads_q * dim, heads_kv * dim, heads_kv * dim), dim=-1)
    k, v = k.view(n, heads_kv, dim), v.view(n, heads_kv, dim)
    shape = (num_blocks, heads_kv, block_size, dim)
    k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=cache_dtype)
    slots = torch.randperm((num_blocks - 1) * block_size, generator=gen)[:n] + block_size
    return k_cache, v_cache, slots.to(device), k, v


def assert_triton_matches_reference(kc, vc, slots, k, v):
    from polarsparse.kernels.kv_write import write_kv

    want_k, want_v = kc.clone(), vc.clone()
    ref.write_kv(want_k, want_v, slots, k, v)
    assert not torch.equal(want_k, kc)  # the case writes something
    write_kv(kc, vc, slots, k, v)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # written slots and untouched ones


CASES = [  # n, Hq, Hkv, D, block size, blocks
    (1, 4, 4, 64, 16, 3),  # MHA, one token (batch-1 decode)
    (5, 8, 2, 32, 8, 4),  # GQA, ragged slots across blocks
    (7, 6, 3, 16, 32, 2),  # Hkv * D not a power of two (masked lanes)
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-hq{c[1]}-hkv{c[2]}-d{c[3]}-bs{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_write_kv_matches_reference(case, dtype):
    assert_triton_matches_reference(*make_case(*case, dtype, dtype, DEVICE))


@needs_triton
def test_triton_write_kv_converts_to_the_cache_dtype():
    assert_triton_matches_reference(*make_case(3, 2, 2, 16, 8, 3, torch.float32, torch.float16, DEVICE))


def test_reference_write_kv_places_each_token_at_its_slot():
    kc, vc, slots, k, v = make_case(4, 2, 2, 8, 4, 3, torch.float32, torch.float32, "cpu")
    ref.write_kv(kc, vc, slots, k, v)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(kc[s // 4, :, s % 4], k[i]) and torch.equal(vc[s // 4, :, s % 4], v[i])


@gpu_only
def test_write_kv_real_shape_gpu():
    """LLaMA-3-8B shape (8 KV heads x 128), 256 tokens, bf16, block 32."""
    assert_triton_matches_reference(*make_case(256, 32, 8, 128, 32, 40, torch.bfloat16, torch.bfloat16, DEVICE))
