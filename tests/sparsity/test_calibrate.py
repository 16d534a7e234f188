"""Calibration tables: smallest k reaching the recall target, monotone in batch size; head budgets."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from polarsparse.sparsity.calibrate import CalibrateSettings, calibrate_layer, cumulative_hits, smallest_k
from polarsparse.sparsity.planner import BATCH_BUCKETS, head_budgets


def _synthetic(tokens: int, neurons: int, density: float, noise: float, seed: int):
    """Labels with a per-neuron firing rate and router logits = truth + noise."""
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(neurons, generator=g) * 2 * density
    labels = torch.rand(tokens, neurons, generator=g) < rate
    logits = labels.float() + noise * torch.randn(tokens, neurons, generator=g)
    return logits, labels


@settings(max_examples=15, deadline=None)
@given(density=st.floats(0.02, 0.3), noise=st.floats(0.1, 2.0), seed=st.integers(0, 1000),
       limit=st.sampled_from([0.5, 0.9, 1.0]))
def test_k_is_monotone_in_batch_size_and_dense_is_absorbing(density, noise, seed, limit):
    logits, labels = _synthetic(512, 256, density, noise, seed)
    s = CalibrateSettings(target=0.95, k_multiple=16, density_limit=limit, samples=4)
    curve = calibrate_layer(logits, labels, s, BATCH_BUCKETS, torch.Generator().manual_seed(seed))
    ks = [256 if k is None else k for k in curve.k]
    assert ks == sorted(ks)
    first_dense = next((i for i, k in enumerate(curve.k) if k is None), len(ks))
    assert all(k is None for k in curve.k[first_dense:])
    assert all(k % 16 == 0 for k in curve.k if k is not None)
    assert curve.union_density[-1] >= curve.union_density[0]


def test_chosen_k_reaches_target_and_one_step_less_does_not():
    logits, labels = _synthetic(1024, 512, 0.05, 0.8, 0)
    s = CalibrateSettings(target=0.99, k_multiple=1, density_limit=1.0, samples=8)
    curve = calibrate_layer(logits, labels, s, (1,), torch.Generator().manual_seed(0))
    assert curve.recall[0] >= 0.99
    assert curve.k[0] < 512  # a useful router needs far fewer than all neurons


def test_smallest_k_rounds_up_to_the_multiple():
    curve = torch.arange(1, 301) / 300  # recall of the top-(j+1) = (j+1)/300: 0.5 first at k = 150
    assert smallest_k(curve, 0.5, 1) == 150
    assert smallest_k(curve, 0.5, 128) == 256
    assert smallest_k(curve, 2.0, 128) == 300  # never reached: all neurons


def test_cumulative_hits_counts_true_neurons_in_score_order():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7]])
    truth = torch.tensor([[True, False, False, True]])
    assert cumulative_hits(scores, truth).tolist() == [[1.0, 2.0, 2.0, 2.0]]


def test_uniform_head_budgets_keep_layer_zero_dense():
    assert head_budgets(3, 4, 0.5) == [None, 2, 2, 2]
    assert head_budgets(3, 4, 0.3) == [None, 1, 1, 1]
    assert head_budgets(9, 3, 0.5) == [None, 5, 5]
    assert head_budgets(4, 3, 1.0) == [None, None, None]


def test_importance_budgets_follow_measured_importance_with_the_same_total():
    importance = [[0.25] * 4, [0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
    ks = head_budgets(4, 4, 0.5, "importance", importance)
    assert ks[0] is None
    assert sum(4 if k is None else k for k in ks[1:]) == 6  # 0.5 * 4 units * 3 layers
    assert ks[1] == 1  # one head carries the layer
    assert ks[3] >= ks[2] >= ks[1]


def test_per_rank_k_covers_the_busiest_shard():
    """Neurons 0..127 fire 4x as often as 128..255: with 2 ranks selecting one k each, the k must
    reach the target inside the busy shard, so it exceeds half the global k; every shard's own
    recall at that k reaches the target, and the per-rank table is monotone like the global one."""
    g = torch.Generator().manual_seed(3)
    rate = torch.cat([torch.full((128,), 0.2), torch.full((128,), 0.05)])
    labels = torch.rand(1024, 256, generator=g) < rate
    logits = labels.float() + 0.7 * torch.randn(1024, 256, generator=g)
    s = CalibrateSettings(target=0.95, k_multiple=8, density_limit=1.0, samples=8, shards=(2, 3))
    curve = calibrate_layer(logits, labels, s, (1, 4, 16), torch.Generator().manual_seed(0))
    assert set(curve.k_sharded) == {2}  # 3 does not divide 256
    local = curve.k_sharded[2]
    assert local == sorted(local) and all(k % 8 == 0 for k in local)
    assert any(kl > -(-k // 2) for kl, k in zip(local, curve.k))  # the busy shard needs more than an even split
    from polarsparse.sparsity.calibrate import recall_curve

    idx = torch.randperm(1024, generator=g)[:16 * 64].view(64, 16)  # batches of 16 tokens
    scores, truth = logits[idx].amax(dim=1), labels[idx].any(dim=1)
    for j in range(2):
        part = slice(128 * j, 128 * (j + 1))
        assert recall_curve(scores[:, part], truth[:, part])[0][local[-1] - 1] >= 0.93  # fresh batches: ~target


def test_engines_split_over_ranks_use_the_calibrated_per_rank_k(tiny_run):
    """`routers calibrate` stores per-rank k for 2/4/8 shards; a planner for 2 shards (a TP=2 rank,
    or selection_shards=2 at TP=1) serves that table, not the global k halved."""
    from polarsparse.config import SparsityConfig
    from polarsparse.sparsity.bundle import RouterBundle
    from polarsparse.sparsity.runtime import make_planners, resolve_config

    bundle = RouterBundle.load(tiny_run["routers"])
    table = bundle.calibration["mlp_k_sharded"]["2"]
    cfg = resolve_config(SparsityConfig(attention=False, mlp=True, selection_shards=2), bundle.defaults)
    planners = make_planners(bundle, cfg, "cpu", torch.float32)
    for b in planners.buckets:
        assert [x.mlp_k for x in planners.table[b]] == table[str(b)]
