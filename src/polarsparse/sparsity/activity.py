"""What "active" means: MLP neurons and attention heads, measured on the dense model.

MLP neuron i of a layer contributes ``a_i * w2t[i]`` to the layer output, where ``a`` is the
activation (``relu(fc1)`` for OPT, ``silu(gate) * up`` for gated SiLU models). Its *contribution*
is ``c_i = |a_i| * ||w2t[i]||``. A neuron is active when ``c_i > t_layer``:

* ReLU models: ``t = 0`` (exactly the neurons with a positive post-activation);
* gated SiLU models: nothing is exactly zero, so ``t`` is calibrated per layer as the largest
  threshold for which dropping every neuron with ``c_i <= t`` changes the MLP output by at most
  ``1 - keep`` of its norm on average: mean_tokens ||y - y_active|| / ||y|| <= 1 - keep.

Head importance is the norm of a head's contribution to the attention output, ``||W_o[:, h] o_h||``
(per query head), and for a KV group the norm of the summed contribution of its query heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from polarsparse.models.layers import MLP


def contribution_scale(mlp: MLP) -> torch.Tensor:
    """||w2t[i]|| per neuron: [I] fp32."""
    return mlp.w2t.float().norm(dim=1)


def neuron_contributions(mlp: MLP, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, d] MLP input -> c: [N, I] fp32, each neuron's output contribution norm."""
    a = mlp.activate(F.linear(x.float(), mlp.w1.float(), None if mlp.b1 is None else mlp.b1.float()))
    return a.abs() * (contribution_scale(mlp) if scale is None else scale)


def silu_threshold(mlp: MLP, x: torch.Tensor, keep: float, iters: int = 18) -> float:
    """Largest contribution threshold t whose dropped neurons change the output by <= 1 - keep of its
    norm on average over the tokens of x [N, d] (bisection on the quantile of c)."""
    xf = x.float()
    a = mlp.activate(F.linear(xf, mlp.w1.float(), None if mlp.b1 is None else mlp.b1.float()))  # [N, I]
    w2t = mlp.w2t.float()
    c = a.abs() * w2t.norm(dim=1)
    y_norm = (a @ w2t).norm(dim=1).clamp_min(1e-12)  # [N]
    flat = c.flatten()
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    lo, hi = 0.0, 1.0  # quantile bounds: error(lo) <= budget < error(hi) (error(1) ~ 1)
    for _ in range(iters):
        mid = (lo + hi) / 2
        t = torch.quantile(sample, mid).item()
        err = ((a * (c <= t)) @ w2t).norm(dim=1) / y_norm
        if err.mean().item() <= 1.0 - keep:
            lo = mid
        else:
            hi = mid
    return float(torch.quantile(sample, lo).item()) if lo > 0 else 0.0


def head_norms(o_in: torch.Tensor, w_o: torch.Tensor, num_heads: int, num_kv_heads: int):
    """Per-head contribution norms of one attention layer.

    o_in: [N, Hq*D] attention output before o_proj; w_o: [d, Hq*D].
    Returns (query-head norms [N, Hq], KV-group norms [N, Hkv]) in fp32.
    """
    n = o_in.shape[0]
    head_dim = o_in.shape[1] // num_heads
    o = o_in.float().view(n, num_heads, head_dim)
    w = w_o.float().view(w_o.shape[0], num_heads, head_dim)
    contrib = torch.einsum("nhk,dhk->nhd", o, w)  # [N, Hq, d]
    groups = contrib.view(n, num_kv_heads, num_heads // num_kv_heads, -1).sum(dim=2)  # [N, Hkv, d]
    return contrib.norm(dim=-1), groups.norm(dim=-1)
