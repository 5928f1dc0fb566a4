"""SCE: select by variance, calculate weights, erase minority signs.

``sce`` — Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990), as
implemented in mergekit (arXiv 2403.13257).

Per tensor, task vectors τ_t = θ_t − θ_0 (T models):

1. Select (``select_topk`` = k < 1): keep, in every τ_t, the entries at the
   int(k · #{σ² ≠ 0}) positions of largest variance σ² = Var_t(τ_t) (population variance across
   the models).
2. Calculate: w_t = mean(τ_t²) / Σ_s mean(τ_s²)   (1/T each when the sum is below 1e-6).
3. Erase: γ = +1 where Σ_t τ_t ≥ 0 else −1;  A_t = [sign(τ_t) = γ].
4. θ = θ_0 + Σ_t A_t w_t τ_t / max(Σ_t A_t w_t, 1e-6).

Positions of equal variance at the cut-off are taken in index order. Same under both
conventions.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods._sparsify import INT8_MASK
from modelalloy.methods.registry import MergeContext, Param, register_method


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Float 0/1 mask of the int(fraction · #nonzero) positions of largest variance across
    the stacked task vectors ``deltas`` (models × ...)."""
    if fraction >= 1.0:
        return torch.ones_like(deltas[0])
    var = deltas.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction) if fraction > 0 else 0
    mask = torch.zeros_like(var)
    if k:
        # stable descending order: equal variances in index order
        order = torch.sort(var.reshape(-1), descending=True, stable=True).indices[:k]
        mask.view(-1)[order] = 1.0
    return mask


@register_method(
    name="sce",
    params=[Param("select_topk", float, 1.0, "fraction of positions kept by variance",
                  ge=0.0, le=1.0), INT8_MASK],
    paper="Wan et al., FuseChat, arXiv 2408.07990 (2024)",
    summary="Keep high-variance positions, weight task vectors by energy, erase minority signs",
    base="required",
    min_models=1,
)
def sce(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
        ctx: MergeContext) -> torch.Tensor:
    assert base is not None  # base="required"
    deltas = torch.stack([e - base for e in experts])
    deltas = deltas * variance_mask(deltas, float(params["select_topk"]))
    energy = deltas.pow(2).reshape(len(experts), -1).mean(-1)
    total = float(energy.sum())
    weights = (torch.full_like(energy, 1.0 / len(experts)) if abs(total) < 1e-6
               else energy / total)
    gamma = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(deltas) == gamma).to(deltas.dtype)
    w = weights.view(-1, *([1] * (deltas.dim() - 1))) * agree
    return base + (deltas * w).sum(0) / w.sum(0).clamp(min=1e-6)
