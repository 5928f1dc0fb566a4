"""Arcee Fusion: take the other model's change only where it matters most.

``arcee_fusion`` — Arcee AI (arcee.ai, 2025), as implemented in mergekit (arXiv 2403.13257).

With θ_0 the base and θ_1 the other model, per tensor (rows along the last dimension; a 1-D
tensor is one row):

    p = softmax(θ_1) + 1e-8,  q = softmax(θ_0) + 1e-8      (per row)
    s = |θ_1 − θ_0| · Σ_row p log(p/q)                     (importance: change × row KL)
    τ = median(s) + 1.5 · (Q3(s) − Q1(s)),   Q_q = sorted(s)[⌊q·(n − 1)⌋]
    θ = θ_0 + [s ≥ τ] ⊙ (θ_1 − θ_0)

Difference from mergekit: mergekit estimates the quantiles of a tensor over 10^6 entries from
a random sample of 10^6 (unseeded, so its result varies from run to run); here they are exact.
Same under both conventions.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods.registry import MergeContext, register_method


def importance(base: torch.Tensor, other: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """s = |θ_1 − θ_0| times the row's KL(softmax θ_1 ‖ softmax θ_0)."""
    p = torch.softmax(other, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    return (other - base).abs() * kl


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5·IQR with the quantiles read at ⌊q·(n − 1)⌋ of the sorted scores."""
    ordered = torch.sort(scores.reshape(-1)).values
    last = ordered.numel() - 1

    def at(q: float) -> torch.Tensor:
        return ordered[int(q * last)]

    return at(0.5) + 1.5 * (at(0.75) - at(0.25))


@register_method(
    name="arcee_fusion",
    params=[],
    paper="Arcee AI, Arcee Fusion (2025); mergekit (arXiv 2403.13257)",
    summary="Keep the other model's changes whose importance (|Δ| × row KL) is an outlier",
    base="required",
    min_models=1,
    max_models=1,
)
def arcee_fusion(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
                 ctx: MergeContext) -> torch.Tensor:
    assert base is not None  # base="required"
    other = experts[0]
    if base.dim() == 0:
        return other.clone()
    scores = importance(base, other)
    keep = (scores >= fusion_threshold(scores)).to(base.dtype)
    return base + (other - base) * keep
