"""Gather-GEMM selective MLP: Triton kernels vs reference, reference vs masked dense."""
import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, DTYPES, gpu_only, needs_triton, rel_err, tolerance

from polarsparse.kernels import reference as ref


def make_mlp(batch, d, inter, k, activation, bias, dtype, device, seed=0):
    """-> x [B, d], w [I or 2I, d], b, w2t [I, d], b2 [d], idx [k] (sorted, unique) or None."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * inter if activation == "silu_gated" else inter
    x = torch.randn(batch, d, generator=gen)
    w = torch.randn(rows, d, generator=gen) / d ** 0.5
    w2t = torch.randn(inter, d, generator=gen) / inter ** 0.5
    b = torch.randn(rows, generator=gen) if bias else None
    b2 = torch.randn(d, generator=gen) if bias else None
    idx = None if k is None else torch.randperm(inter, generator=gen)[:k].sort().values
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(w), to(b), to(w2t), to(b2), (None if idx is None else idx.to(device))


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("activation", ["relu", "silu_gated"])
def test_reference_fc1_fc2_equal_masked_dense(activation):
    """Gathering k neurons == running the dense MLP with the other neurons masked to zero."""
    x, w, b, w2t, b2, idx = make_mlp(4, 24, 40, 12, activation, True, torch.float64, "cpu")
    inter = w2t.shape[0]
    y = F.linear(x, w, b)
    h_dense = torch.relu(y) if activation == "relu" else F.silu(y[:, :inter]) * y[:, inter:]
    mask = torch.zeros(inter, dtype=torch.bool)
    mask[idx] = True
    h = ref.gather_fc1(x, w, b, idx, activation)
    torch.testing.assert_close(h, h_dense[:, idx])
    y_masked = (h_dense * mask) @ w2t + b2
    torch.testing.assert_close(ref.gather_fc2(h, w2t, b2, idx), y_masked)
    torch.testing.assert_close(ref.gather_fc1(x, w, b, None, activation), h_dense)
    torch.testing.assert_close(ref.gather_fc2(h_dense, w2t, b2, None), h_dense @ w2t + b2)


def test_reference_rejects_unknown_activation():
    x, w, b, *_ = make_mlp(1, 8, 8, None, "relu", False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="activation"):
        ref.gather_fc1(x, w, b, None, "gelu")


def test_mlp_union_topk_is_sorted_batch_union():
    scores = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 4.0]])
    idx = ref.mlp_union_topk(scores, 3)
    assert idx.dtype == torch.int64 and idx.tolist() == [0, 1, 4]


# --------------------------------------------------------------------------- triton
def configs():
    """(id, MlpConfig | None): heuristic; one split with even K; uneven K split three ways."""
    from polarsparse.kernels.mlp import MlpConfig

    return [("auto", None),
            ("even1", MlpConfig(16, 64, 64, 4, 1, splits=1)),
            ("uneven3", MlpConfig(16, 32, 128, 4, 1, splits=3))]


CFG_IDS = ["auto", "even1", "uneven3"]
# B=20 spans two batch tiles of 16; d=320 is not a multiple of 128 (uneven K for fc1).
SHAPE = dict(batch=20, d=320, inter=192)


@needs_triton
@pytest.mark.parametrize("cfg_id", CFG_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sel", ["idx", "all_idx", "none"])
@pytest.mark.parametrize("activation", ["relu", "silu_gated"])
def test_triton_fc1_fc2_match_reference(activation, sel, dtype, cfg_id):
    from polarsparse.kernels.mlp import triton_gather_fc1, triton_gather_fc2

    cfg = dict(configs())[cfg_id]
    k = {"idx": 72, "all_idx": SHAPE["inter"], "none": None}[sel]
    bias = activation == "relu"
    x, w, b, w2t, b2, idx = make_mlp(**SHAPE, k=k, activation=activation, bias=bias,
                                     dtype=dtype, device=DEVICE, seed=k or 1)
    if sel == "all_idx":
        idx = torch.arange(SHAPE["inter"], device=DEVICE, dtype=torch.int32)
    h = triton_gather_fc1(x, w, b, idx, activation, config=cfg)
    torch.testing.assert_close(h.float(), ref.gather_fc1(x, w, b, idx, activation).float(),
                               **tolerance(dtype))
    y = triton_gather_fc2(h, w2t, b2, idx, config=cfg)
    assert y.dtype == dtype and y.shape == (SHAPE["batch"], SHAPE["d"])
    torch.testing.assert_close(y.float(), ref.gather_fc2(h, w2t, b2, idx).float(),
                               **tolerance(dtype))


@needs_triton
@pytest.mark.parametrize("activation", ["relu", "silu_gated"])
def test_big_tile_split_merge_loop(activation):
    """Tiles above 2048 elements merge their splits in a loop rather than unrolled."""
    from polarsparse.kernels.mlp import MlpConfig, triton_gather_fc1, triton_gather_fc2

    cfg = MlpConfig(32, 128, 64, 4, 1, splits=2)
    x, w, b, w2t, b2, idx = make_mlp(**SHAPE, k=72, activation=activation, bias=True,
                                     dtype=torch.float32, device=DEVICE, seed=11)
    h = triton_gather_fc1(x, w, b, idx, activation, config=cfg)
    torch.testing.assert_close(h, ref.gather_fc1(x, w, b, idx, activation), atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(triton_gather_fc2(h, w2t, b2, idx, config=cfg),
                               ref.gather_fc2(h, w2t, b2, idx), atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("activation", ["relu", "silu_gated"])
def test_gated_bias_and_single_row(activation):
    """Batch 1 with a bias on the fused gate/up weight (both halves offset correctly)."""
    from polarsparse.kernels.mlp import triton_gather_fc1

    x, w, b, _, _, idx = make_mlp(1, 128, 64, 16, activation, True, torch.float32, DEVICE)
    torch.testing.assert_close(triton_gather_fc1(x, w, b, idx, activation),
                               ref.gather_fc1(x, w, b, idx, activation), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "silu_gated"])
def test_dense_fallback_matches_reference(activation):
    """The cuBLAS fallback used above break-even density has the gather semantics."""
    from polarsparse.kernels.mlp import dense_fc1, dense_fc2

    x, w, b, w2t, b2, idx = make_mlp(3, 32, 48, 40, activation, True, torch.float32, "cpu")
    h = dense_fc1(x, w, b, idx, activation)
    torch.testing.assert_close(h, ref.gather_fc1(x, w, b, idx, activation))
    torch.testing.assert_close(dense_fc2(h, w2t, b2, idx), ref.gather_fc2(h, w2t, b2, idx))
    torch.testing.assert_close(dense_fc2(h, w2t, None, idx), ref.gather_fc2(h, w2t, None, idx))


def test_split_planner_widens_small_batches():
    from polarsparse.kernels.mlp import MlpConfig, plan_split_k

    cfg = MlpConfig(16, 64, 128, 4, 4)
    splits, per = plan_split_k(cfg, tiles=26, k=4096, sms=132)
    assert splits > 1 and per % 128 == 0 and splits * per >= 4096
    assert plan_split_k(cfg, tiles=1024, k=4096, sms=132) == (1, 4096)
    if DEVICE.type == "cpu":  # the split tests above left every counter at zero
        from polarsparse.kernels._launch import split_counters

        assert int(split_counters(DEVICE, 1).abs().sum()) == 0


# --------------------------------------------------------------------------- GPU, real shapes
REAL = {"opt-6.7b": (4096, 16384, "relu", True), "llama3-8b": (4096, 14336, "silu_gated", False)}


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 8, 32, 256])
@pytest.mark.parametrize("model", list(REAL))
def test_triton_mlp_real_shapes(model, batch, density):
    from polarsparse.kernels import mlp

    d, inter, activation, bias = REAL[model]
    k = max(128, int(density * inter) // 128 * 128)
    x, w, b, w2t, b2, idx = make_mlp(batch, d, inter, k, activation, bias, torch.bfloat16,
                                     DEVICE)
    h = mlp.triton_gather_fc1(x, w, b, idx, activation)
    h_ref = ref.gather_fc1(x, w, b, idx, activation)
    assert rel_err(h, h_ref) < 1e-2
    y = mlp.triton_gather_fc2(h_ref, w2t, b2, idx)
    assert rel_err(y, ref.gather_fc2(h_ref, w2t, b2, idx)) < 1e-2
    y_auto = mlp.gather_fc2(mlp.gather_fc1(x, w, b, idx, activation), w2t, b2, idx)
    assert rel_err(y_auto, ref.gather_fc2(h_ref, w2t, b2, idx)) < 2e-2


@gpu_only
@pytest.mark.gpu
def test_triton_mlp_cuda_graph_replay():
    from polarsparse.kernels.mlp import triton_gather_fc1, triton_gather_fc2

    x, w, b, w2t, b2, idx = make_mlp(8, 4096, 14336, 1536, "silu_gated", False, torch.bfloat16,
                                     DEVICE)
    run = lambda: triton_gather_fc2(triton_gather_fc1(x, w, b, idx, "silu_gated"),  # noqa: E731
                                    w2t, b2, idx)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    x.copy_(torch.randn_like(x))
    idx.copy_(torch.randperm(14336, device=DEVICE)[:1536].sort().values)
    graph.replay()
    expect = ref.gather_fc2(ref.gather_fc1(x, w, b, idx, "silu_gated"), w2t, b2, idx)
    assert rel_err(y, expect) < 2e-2


def test_all_neurons_take_the_dense_path_without_gathering():
    from polarsparse.kernels import mlp

    x, w, b, w2t, b2, _ = make_mlp(2, 16, 24, None, "silu_gated", True, torch.float32, "cpu")
    idx = torch.arange(24)
    assert mlp.use_dense_fallback(2, 24, 24)
    h = mlp.gather_fc1(x, w, b, idx, "silu_gated")
    torch.testing.assert_close(h, ref.gather_fc1(x, w, b, None, "silu_gated"))
    torch.testing.assert_close(mlp.gather_fc2(h, w2t, b2, idx), ref.gather_fc2(h, w2t, b2, None))
