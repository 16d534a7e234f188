"""Selective-head paged decode attention: Triton kernel vs reference, reference vs SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, DTYPES, gpu_only, needs_triton, rel_err, tolerance

from polarsparse.kernels import reference as ref

# (name, Hq, Hkv, D, block_size)
GEOMETRIES = [("mha", 4, 4, 64, 16), ("gqa", 8, 2, 64, 32)]
MODES = ["dense", "k1", "half", "kall"]


def make_case(batch, hq, hkv, d, bs, ctx_lens, dtype, device, mode, seed=0):
    """Random paged KV with a shuffled block table. Every slot the kernel must not read (past a
    sequence's context, or a KV group that was not chosen) holds NaN, so a stray read shows."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(c / bs) for c in ctx_lens) + 1  # +1: trailing junk entries
    num_blocks = batch * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    k_seq = torch.randn(batch, hkv, max_blocks * bs, d, generator=gen)  # contiguous truth
    v_seq = torch.randn(batch, hkv, max_blocks * bs, d, generator=gen)
    head_idx = make_head_idx(batch, hkv, mode, gen)
    chosen = ref.chosen_group_mask(head_idx, batch, hkv, torch.device("cpu"))  # [B, Hkv]
    valid = torch.arange(max_blocks * bs)[None, :] < torch.tensor(ctx_lens)[:, None]  # [B, T]
    keep = chosen[:, :, None, None] & valid[:, None, :, None]
    k_seq = torch.where(keep, k_seq, float("nan"))
    v_seq = torch.where(keep, v_seq, float("nan"))
    k_cache = torch.full((num_blocks, hkv, bs, d), float("nan"))
    v_cache = torch.full((num_blocks, hkv, bs, d), float("nan"))
    for b in range(batch):
        for j in range(max_blocks):
            k_cache[perm[b, j]] = k_seq[b, :, j * bs:(j + 1) * bs]
            v_cache[perm[b, j]] = v_seq[b, :, j * bs:(j + 1) * bs]
    block_tables = perm.int()
    for b, c in enumerate(ctx_lens):  # entries past a sequence's blocks may be anything
        block_tables[b, math.ceil(c / bs):] = 0
    q = torch.randn(batch, hq, d, generator=gen)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k_cache.to(dtype=dtype, **to),
            v_cache.to(dtype=dtype, **to), block_tables.to(**to),
            torch.tensor(ctx_lens, dtype=torch.int32, device=device),
            None if head_idx is None else head_idx.to(**to))


def make_head_idx(batch, hkv, mode, gen):
    """[B, k] sorted KV-group indices (or None for dense)."""
    if mode == "dense":
        return None
    k = {"k1": 1, "half": max(1, hkv // 2), "kall": hkv}[mode]
    scores = torch.rand(batch, hkv, generator=gen)
    return ref.head_topk(scores, k).to(torch.int32)


def check_against_reference(out, args, scale, dtype):
    q, k_cache, v_cache, block_tables, ctx, head_idx = args
    expect = ref.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, scale, head_idx)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "a poisoned (unread) KV slot leaked into the output"
    batch, hq, _ = q.shape
    hkv = k_cache.shape[1]
    chosen = ref.chosen_group_mask(head_idx, batch, hkv, q.device)
    unchosen = (~chosen).repeat_interleave(hq // hkv, dim=1)  # [B, Hq]
    assert (out[unchosen] == 0).all(), "unchosen heads must be exactly zero"
    torch.testing.assert_close(out.float(), expect.float(), **tolerance(dtype))


# --------------------------------------------------------------------------- reference
def test_reference_matches_sdpa_on_contiguous_kv():
    """The paged reference equals per-sequence SDPA (with GQA expansion) on contiguous K/V."""
    hq, hkv, d, bs = 8, 2, 32, 16
    ctx_lens = [5, 32, 47]
    q, kc, vc, bt, ctx, _ = make_case(3, hq, hkv, d, bs, ctx_lens, torch.float32, "cpu", "dense")
    scale = d ** -0.5
    out = ref.paged_decode_attention(q, kc, vc, bt, ctx, scale)
    for b, n in enumerate(ctx_lens):
        slots = [(bt[b, t // bs].item(), t % bs) for t in range(n)]
        k = torch.stack([kc[p, :, s] for p, s in slots], dim=1)  # [Hkv, n, D]
        v = torch.stack([vc[p, :, s] for p, s in slots], dim=1)
        k, v = (t.repeat_interleave(hq // hkv, dim=0) for t in (k, v))
        expect = F.scaled_dot_product_attention(q[b, :, None], k, v, scale=scale)[:, 0]
        torch.testing.assert_close(out[b], expect, atol=1e-5, rtol=1e-5)


def test_reference_zeroes_unchosen_and_ignores_garbage():
    q, kc, vc, bt, ctx, hidx = make_case(3, 8, 4, 16, 16, [3, 20, 33], torch.float32, "cpu",
                                         "half")
    out = ref.paged_decode_attention(q, kc, vc, bt, ctx, 0.25, hidx)
    check_against_reference(out, (q, kc, vc, bt, ctx, hidx), 0.25, torch.float32)


def test_head_topk_sorted_per_row():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.3, 0.1]])
    assert ref.head_topk(scores, 2).tolist() == [[1, 3], [0, 2]]
    assert ref.head_topk(scores, 2).dtype == torch.int64


# --------------------------------------------------------------------------- triton
@needs_triton
@pytest.mark.parametrize("splits", [None, 3], ids=["auto", "split3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_triton_attention_matches_reference(geom, mode, dtype, splits):
    from polarsparse.kernels.attention import triton_paged_decode_attention

    _, hq, hkv, d, bs = geom
    ctx_lens = [1, 2 * bs, 3 * bs - 5]  # one token, an exact block multiple, ragged
    args = make_case(3, hq, hkv, d, bs, ctx_lens, dtype, DEVICE, mode, seed=MODES.index(mode))
    scale = d ** -0.5
    out = triton_paged_decode_attention(*args[:5], scale, args[5], num_splits=splits)
    check_against_reference(out, args, scale, dtype)


@needs_triton
def test_triton_attention_head_dim_128_int64_idx():
    from polarsparse.kernels.attention import triton_paged_decode_attention

    q, kc, vc, bt, ctx, hidx = make_case(2, 8, 4, 128, 16, [17, 40], torch.float32, DEVICE,
                                         "half", seed=3)
    out = triton_paged_decode_attention(q, kc, vc, bt, ctx, 0.1, hidx.long(), num_splits=2)
    check_against_reference(out, (q, kc, vc, bt, ctx, hidx), 0.1, torch.float32)


# --------------------------------------------------------------------------- GPU, real shapes
@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dense", "k1", "half", "kall"])
@pytest.mark.parametrize("model", ["llama3-8b", "opt-6.7b"])
def test_triton_attention_real_shapes(model, mode):
    from polarsparse.kernels.attention import triton_paged_decode_attention

    hq, hkv = (32, 8) if model == "llama3-8b" else (32, 32)
    ctx_lens = [1, 1000, 4096, 2500, 33, 8191]
    args = make_case(len(ctx_lens), hq, hkv, 128, 32, ctx_lens, torch.bfloat16, DEVICE, mode)
    out = triton_paged_decode_attention(*args[:5], 128 ** -0.5, args[5])
    check_against_reference(out, args, 128 ** -0.5, torch.bfloat16)
    expect = ref.paged_decode_attention(*args[:5], 128 ** -0.5, args[5])
    assert rel_err(out, expect) < 1e-2


@gpu_only
@pytest.mark.gpu
def test_triton_attention_cuda_graph_replay():
    """Captured once, replayed on new contexts and head choices: still exact."""
    from polarsparse.kernels.attention import triton_paged_decode_attention

    args = list(make_case(4, 32, 8, 128, 32, [2000] * 4, torch.bfloat16, DEVICE, "dense"))
    args[4].copy_(torch.tensor([300, 1, 2000, 64], dtype=torch.int32))
    args[5] = torch.tensor([[0, 1, 2, 3]] * 4, dtype=torch.int32, device=DEVICE)
    scale = 128 ** -0.5
    triton_paged_decode_attention(*args[:5], scale, args[5])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_paged_decode_attention(*args[:5], scale, args[5])
    args[4].copy_(torch.tensor([1999, 5, 17, 1000], dtype=torch.int32))
    args[5].copy_(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6], [1, 3, 5, 7]]))
    graph.replay()
    expect = ref.paged_decode_attention(*args[:5], scale, args[5])
    torch.testing.assert_close(out.float(), expect.float(), **tolerance(torch.bfloat16))


@needs_triton
def test_split_counters_are_reset_after_a_split_launch():
    """The last split of each pair resets its counter, so the next launch starts from zero."""
    from polarsparse.kernels._launch import split_counters
    from polarsparse.kernels.attention import triton_paged_decode_attention

    args = make_case(2, 4, 4, 64, 16, [40, 9], torch.float32, DEVICE, "half", seed=5)
    for _ in range(2):
        out = triton_paged_decode_attention(*args[:5], 0.125, args[5], num_splits=3)
        check_against_reference(out, args, 0.125, torch.float32)
    assert int(split_counters(DEVICE, 1).abs().sum()) == 0


@needs_triton
def test_many_splits_merge_in_chunks():
    """More than 16 splits: the merge reads the partials in several chunks (and some are empty)."""
    from polarsparse.kernels.attention import AttnConfig, triton_paged_decode_attention

    cfg = AttnConfig(block_n=16, num_warps=4, num_stages=1, min_split_tokens=16,
                     programs_per_sm=1)
    args = make_case(2, 8, 2, 64, 16, [300, 70], torch.float32, DEVICE, "k1", seed=7)
    out = triton_paged_decode_attention(*args[:5], 0.125, args[5], num_splits=20, config=cfg)
    check_against_reference(out, args, 0.125, torch.float32)
