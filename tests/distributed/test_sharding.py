"""Per-shard selection (what each tensor-parallel rank does) against a per-rank computation."""
from __future__ import annotations

import pytest
import torch

from polarsparse.config import ConfigError
from polarsparse.distributed.state import TensorParallel
from polarsparse.sparsity.routers import HeadRouter, LayerRouters, MLPRouter
from polarsparse.sparsity.sharding import local_k, shard_layer_routers, sharded_head_topk, sharded_union_topk


def test_local_k_rounds_up_per_shard_and_turns_dense():
    assert local_k(None, 64, 2) is None
    assert local_k(5, 8, 2) == 3
    assert local_k(40, 128, 2, multiple=16) == 32
    assert local_k(100, 128, 2, multiple=16) is None  # 64 per shard = all of it
    with pytest.raises(ConfigError):
        local_k(4, 9, 2)


def test_sharded_topk_equals_each_shards_own_topk():
    torch.manual_seed(0)
    scores = torch.randn(3, 12)
    got = sharded_head_topk(scores, 2, 3)
    for s in range(3):
        part = scores[:, 4 * s : 4 * s + 4]
        want = part.topk(2, dim=1).indices.sort(dim=1).values + 4 * s
        assert torch.equal(got[:, 2 * s : 2 * s + 2], want)
    union = sharded_union_topk(scores, 2, 2)
    assert union.shape == (4,) and torch.equal(union, union.sort().values)
    assert set(union[:2].tolist()) <= set(range(6)) and set(union[2:].tolist()) <= set(range(6, 12))


def test_sharded_routers_output_this_ranks_slice():
    torch.manual_seed(0)
    routers = torch.nn.ModuleList([LayerRouters(HeadRouter(8, 4), MLPRouter(8, 3, 6))])
    h = torch.randn(2, 8)
    for rank in range(2):
        local = shard_layer_routers(routers, TensorParallel(rank, 2))[0]
        torch.testing.assert_close(local.head(h), routers[0].head(h)[:, 2 * rank : 2 * rank + 2])
        torch.testing.assert_close(local.mlp(h), routers[0].mlp(h)[:, 3 * rank : 3 * rank + 3])
