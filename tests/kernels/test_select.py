"""Exact top-k selection: reference semantics, Triton kernels (interpreter on CPU, compiled on GPU).

The rule under test: the k largest values (NaN above +inf, -0.0 == +0.0), ties broken by the
lower index, indices sorted ascending. Tie-heavy inputs make a wrong tie-break or an unsorted
output fail an exact ``torch.equal``.
"""
import pytest
import torch
from kernel_helpers import DEVICE, HAS_CUDA, gpu_only, needs_triton

import polarsparse.kernels as K
from polarsparse.kernels import reference as ref

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["random", "ties", "equal", "special"]


def definition(v: torch.Tensor, k: int) -> torch.Tensor:
    """The rule spelled out on the host in fp64: rank by (value desc, index asc), take k, sort."""
    rows = []
    for row in v.double().cpu().tolist():
        rank = lambda i: (float("inf"), 1) if row[i] != row[i] else (row[i], 0)  # noqa: E731
        order = sorted(range(len(row)), key=lambda i: (-rank(i)[1], -rank(i)[0], i))
        rows.append(sorted(order[:k]))
    return torch.tensor(rows, dtype=torch.int64, device=v.device).view(len(rows), k)


def make_scores(batch: int, n: int, mode: str, dtype: torch.dtype, device=DEVICE,
                seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, n, generator=g, dtype=torch.float64) * 3
    if mode == "ties":  # a handful of distinct values: every threshold sits inside a tie run
        v = v.round().clamp(-3, 3)
    elif mode == "equal":
        v = torch.full((batch, n), 0.5, dtype=torch.float64)
    elif mode == "special":  # -inf, +inf, NaN and both zeros among ties
        v = v.round().clamp(-2, 2)
        v[:, 1::5] = float("-inf")
        v[:, 2::7] = -0.0
        v[:, 3::11] = 0.0
        v[:, 4::13] = float("inf")
        v[0, 6::41] = float("nan")
    return v.to(dtype).to(device)


def check_k_values(n: int) -> list[int]:
    return sorted({1, 2, 64 if n > 64 else n // 2, n // 2, n - 1, n})


# --------------------------------------------------------------------------- reference
def test_reference_tie_break_and_order_by_hand():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    assert ref.head_topk(scores, 2).tolist() == [[1, 2]]  # three 3.0s: the lower indices win
    assert ref.head_topk(scores, 4).tolist() == [[1, 2, 3, 4]]
    special = torch.tensor([[0.0, -0.0, float("nan"), float("inf"), float("-inf"), -0.0]])
    assert ref.head_topk(special, 1).tolist() == [[2]]  # NaN ranks above +inf
    assert ref.head_topk(special, 3).tolist() == [[0, 2, 3]]  # -0.0 ties +0.0: index 0 first
    assert ref.head_topk(special, 5).tolist() == [[0, 1, 2, 3, 5]]
    union = torch.tensor([[0.0, 5.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0, 1.0]])
    idx = ref.mlp_union_topk(union, 3)
    assert idx.dtype == torch.int64 and idx.tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", ALL_DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("n", [37, 256, 300, 1500])  # both sides of the sort / threshold switch
def test_reference_equals_definition(dtype, n):
    for mode in MODES:
        v = make_scores(3, n, mode, dtype, seed=n)
        for k in check_k_values(n) + [0]:
            got = ref.head_topk(v, k)
            assert got.dtype == torch.int64 and got.shape == (3, k)
            assert torch.equal(got, definition(v, k)), (mode, k)
            union = ref.mlp_union_topk(v, k)
            assert torch.equal(union, definition(v.amax(0, keepdim=True), k)[0]), (mode, k)


def test_reference_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k="):
        ref.mlp_union_topk(torch.randn(2, 10), 11)
    with pytest.raises(ValueError, match="k="):
        ref.head_topk(torch.randn(2, 300), 301)


# --------------------------------------------------------------------------- triton (interpreter)
@needs_triton
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 9])  # 1 and 3: fused batch max; 9: the batch-max kernel
def test_triton_union_topk_matches_reference(batch, dtype):
    from polarsparse.kernels.select import FUSED_BATCH, union_topk

    assert 3 <= FUSED_BATCH < 9
    n = 700  # not a power of two: masked lanes in every block
    for i, mode in enumerate(MODES):
        scores = make_scores(batch, n, mode, dtype, seed=10 * batch + i)
        for k in ([1, 64, n - 1] if mode == "random" else [5, 300, n]):
            got = union_topk(scores, k)
            want = ref.mlp_union_topk(scores, k)
            assert got.dtype == torch.int64 and torch.equal(got, want), (mode, k)


@needs_triton
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("units", [8, 33, 600])
def test_triton_head_topk_matches_reference(units, dtype):
    from polarsparse.kernels.select import head_topk

    for i, mode in enumerate(["random", "ties", "special"]):
        scores = make_scores(4, units, mode, dtype, seed=units + i)
        for k in sorted({1, units // 2, units - 1}):
            got = head_topk(scores, k)
            assert got.shape == (4, k) and torch.equal(got, ref.head_topk(scores, k)), (mode, k)


@needs_triton
def test_triton_all_equal_gives_first_k_and_every_index():
    """A wrong tie-break or an unsorted write fails here on any k < n."""
    from polarsparse.kernels.select import head_topk, union_topk

    scores = torch.zeros(2, 500, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(union_topk(scores, 128).cpu(), torch.arange(128))
    assert torch.equal(union_topk(scores, 500).cpu(), torch.arange(500))
    assert torch.equal(head_topk(scores[:, :20], 7).cpu(), torch.arange(7).expand(2, 7))


@needs_triton
def test_triton_strided_inputs_and_empty_k():
    from polarsparse.kernels.select import head_topk, union_topk

    wide = make_scores(12, 300, "ties", torch.float32, seed=5)
    rows = wide[:, 20:270]  # row stride 300, not n
    cols = make_scores(250, 6, "ties", torch.float32, seed=6).t()  # column stride != 1
    for x in (rows[:2], rows, cols):
        assert torch.equal(union_topk(x, 100), ref.mlp_union_topk(x, 100))
    assert torch.equal(head_topk(rows[:3], 9), ref.head_topk(rows[:3], 9))
    assert union_topk(rows, 0).shape == (0,) and head_topk(rows, 0).shape == (12, 0)
    with pytest.raises(ValueError, match="k="):
        union_topk(rows, 251)


@needs_triton
def test_triton_falls_back_to_reference_beyond_its_limits(monkeypatch):
    from polarsparse.kernels import select

    monkeypatch.setattr(select, "MAX_TRITON_N", 64)
    calls = []
    monkeypatch.setattr(select.reference, "mlp_union_topk",
                        lambda s, k: calls.append("union") or ref.topk_rows(s.amax(0)[None], k)[0])
    scores = make_scores(2, 100, "ties", torch.float32)
    assert torch.equal(select.union_topk(scores, 10), ref.topk_rows(scores.amax(0)[None], 10)[0])
    f64 = make_scores(2, 50, "ties", torch.float64)
    assert torch.equal(select.union_topk(f64, 10), ref.topk_rows(f64.amax(0)[None], 10)[0])
    assert calls == ["union", "union"]


# --------------------------------------------------------------------------- GPU, real shapes
@gpu_only
@needs_triton
@pytest.mark.parametrize("batch", [1, 64, 256])
@pytest.mark.parametrize("inter", [16384, 14336])
def test_gpu_union_topk_real_shapes(inter, batch):
    from polarsparse.kernels.select import union_topk

    for mode in ["random", "ties", "special"]:
        scores = make_scores(batch, inter, mode, torch.bfloat16, device="cuda", seed=batch)
        for k in [1, 128, int(0.1 * inter), int(0.3 * inter) // 64 * 64, inter // 2 + 1,
                  inter - 1, inter]:
            got = union_topk(scores, k)
            assert torch.equal(got, ref.mlp_union_topk(scores, k)), (mode, k)
    for dtype in (torch.float32, torch.float16):
        scores = make_scores(batch, inter, "ties", dtype, device="cuda")
        assert torch.equal(union_topk(scores, 4096), ref.mlp_union_topk(scores, 4096))


@gpu_only
@needs_triton
@pytest.mark.parametrize("units", [8, 32, 64, 8192])  # 8192: a TP shard of a union (one row)
def test_gpu_head_topk_real_shapes(units):
    from polarsparse.kernels.select import head_topk

    for dtype in ALL_DTYPES:
        for mode in ["random", "ties", "special"]:
            scores = make_scores(1 if units > 64 else 256, units, mode, dtype, device="cuda")
            for k in sorted({1, units // 2, units - 1}):
                assert torch.equal(head_topk(scores, k), ref.head_topk(scores, k)), (mode, k)


@gpu_only
@needs_triton
def test_gpu_dispatch_and_cuda_graph_replay():
    inter, k = 16384, 4096
    static = make_scores(64, inter, "random", torch.bfloat16, device="cuda")
    heads = make_scores(64, 32, "random", torch.bfloat16, device="cuda")
    K.mlp_union_topk(static, k), K.head_topk(heads, 16)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx = K.mlp_union_topk(static, k)
        hidx = K.head_topk(heads, 16)
    for seed in range(3):
        static.copy_(make_scores(64, inter, "ties", torch.bfloat16, device="cuda", seed=seed))
        heads.copy_(make_scores(64, 32, "ties", torch.bfloat16, device="cuda", seed=seed))
        graph.replay()
        assert torch.equal(idx, ref.mlp_union_topk(static, k))
        assert torch.equal(hidx, ref.head_topk(heads, 16))


def test_cpu_dispatch_uses_reference():
    scores = make_scores(3, 400, "ties", torch.float32, device="cpu")
    assert torch.equal(K.mlp_union_topk(scores, 50), ref.mlp_union_topk(scores, 50))
    assert torch.equal(K.head_topk(scores, 9), ref.head_topk(scores, 9))
    assert not HAS_CUDA or K.mlp_union_topk(scores.cuda(), 50).is_cuda
