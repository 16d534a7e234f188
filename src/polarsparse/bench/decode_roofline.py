"""Bytes one decode step must move, dense or sparse (the byte roofline of the decode benchmark).

A step reads every weight it uses once (the embedding table only for the batch's rows), the K/V of
every (sequence, KV group) it attends with over the whole context, and writes the new K/V and the
logits. Sparse parts read only the chosen KV groups and neuron rows, plus their routers.
Roofline time = bytes / measured copy bandwidth (bench.roofline).
"""
from __future__ import annotations

from torch import nn

from polarsparse.bench.roofline import decode_attention_bytes, gather_gemm_bytes
from polarsparse.models.base import CausalLM
from polarsparse.models.layers import DecoderLayer
from polarsparse.sparsity.planner import LayerBudget

DENSE = LayerBudget(None, None)


def _param_bytes(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


def _layer_bytes(layer: DecoderLayer, batch: int, context: int, budget: LayerBudget,
                 routers: nn.Module | None, elem: int) -> int:
    attn, mlp = layer.attn, layer.mlp
    d, hq, hkv, hd = mlp.w1.shape[1], attn.num_heads, attn.num_kv_heads, attn.head_dim
    act = batch * d * elem
    total = _param_bytes(layer.norm1) + _param_bytes(layer.norm2) + 4 * act  # norms, residual reads/writes
    total += _param_bytes(attn) + 2 * act + batch * (hq + 2 * hkv) * hd * elem  # qkv + o_proj and their I/O
    total += 2 * batch * hkv * hd * elem  # new K/V written
    total += decode_attention_bytes(batch, hq, hkv, hd, context, budget.head_k or hkv, elem)
    total += _mlp_bytes(mlp, batch, budget.mlp_k, elem)
    if routers is not None:
        if budget.head_k is not None and routers.head is not None:
            total += _param_bytes(routers.head) + act
        if budget.mlp_k is not None and routers.mlp is not None:
            total += _param_bytes(routers.mlp) + act
    return total


def _mlp_bytes(mlp: nn.Module, batch: int, k: int | None, elem: int) -> int:
    """fc1 (+activation) and fc2 over k chosen neurons (all when k is None)."""
    inter, d = mlp.w2t.shape
    k = inter if k is None else k
    fc1_rows = 2 * k if mlp.activation == "silu_gated" else k
    fc1 = gather_gemm_bytes(batch, fc1_rows, d, d, k, elem, bias_len=fc1_rows if mlp.b1 is not None else 0)
    fc2 = gather_gemm_bytes(batch, k, d, k, d, elem, bias_len=d if mlp.b2 is not None else 0)
    return fc1 + fc2


def step_bytes(model: CausalLM, batch: int, context: int, budgets: list[LayerBudget] | None = None,
               routers: nn.ModuleList | None = None) -> int:
    """Bytes a decode step of ``batch`` sequences at ``context`` tokens must move.

    budgets: per-layer LayerBudget of a sparse step (None: dense); routers: the planner's
    per-layer LayerRouters (their weights are read where a part is sparse).
    """
    elem = model.lm_head_weight().element_size()
    d = model.cfg.hidden_size
    head = model.lm_head_weight()
    total = head.numel() * head.element_size() + batch * head.shape[0] * 4  # LM head + fp32 logits
    total += batch * head.shape[1] * elem * (2 if model.cfg.family == "opt" else 1)  # embedding rows
    total += sum(p.numel() * p.element_size() for name, p in model.named_parameters()  # final norm, projections
                 if not name.startswith(("layers.", "embed_")) and p is not head)
    total += 2 * batch * d * elem  # final norm in/out
    for i, layer in enumerate(model.layers):
        budget = budgets[i] if budgets is not None else DENSE
        total += _layer_bytes(layer, batch, context, budget, routers[i] if routers is not None else None, elem)
    return total
