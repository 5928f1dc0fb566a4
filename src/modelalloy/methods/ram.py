"""RAM and RAM+ (tensor-local): average task vectors only where several models changed.

``ram`` / ``ramplus_tl`` — "Reinforced Agent Merging" (arXiv 2601.13572), as implemented in
mergekit (arXiv 2403.13257).

Per tensor, task vectors τ_t = θ_t − θ_0, the mask m_t = [|τ_t| > ε] and the count
c = Σ_t m_t of models that changed each entry:

    ram:         θ = θ_0 + Σ_t m_t τ_t · ([c = 1] + [c > 1] / c)

Entries one model changed keep that change; shared entries take the mean of the changes.
``ramplus_tl`` scales each model's unique entries by λ_t = 1 + r · clamp(ρ_t, 0, α) with
ρ_t = #{m_t ∧ c > 1} / max(#{m_t ∧ c = 1}, ε) (the tensor's share of overlap for that model):

    ramplus_tl:  θ = θ_0 + Σ_t m_t τ_t · (λ_t [c = 1] + [c > 1] / c)

Defaults (mergekit's): ε = 1e-5, r = 0.1, α = 0.2. Same under both conventions.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods.registry import MergeContext, Param, register_method

PAPER = "Reinforced Agent Merging, arXiv 2601.13572; mergekit (arXiv 2403.13257)"
EPSILON = Param("epsilon", float, 1e-5, "|τ| above which an entry counts as changed", ge=0.0)


def _masked(base: torch.Tensor, experts: list[torch.Tensor], eps: float):
    deltas = torch.stack([e - base for e in experts]).reshape(len(experts), -1)
    changed = deltas.abs() > eps
    count = changed.sum(0, keepdim=True)
    return deltas * changed, changed, count


@register_method(
    name="ram",
    params=[EPSILON],
    paper=PAPER,
    summary="Keep changes unique to one model, average the changes several models share",
    base="required",
    min_models=1,
)
def ram(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
        ctx: MergeContext) -> torch.Tensor:
    assert base is not None  # base="required"
    deltas, _, count = _masked(base, experts, float(params["epsilon"]))
    merged = torch.where(count > 1, deltas / count.clamp(min=1), deltas)
    return base + merged.sum(0).view(base.shape)


@register_method(
    name="ramplus_tl",
    params=[EPSILON,
            Param("r", float, 0.1, "gain on a model's unique changes per unit of overlap"),
            Param("alpha", float, 0.2, "cap on the overlap ratio ρ", ge=0.0)],
    paper=PAPER,
    summary="RAM with each model's unique changes boosted by its overlap ratio (per tensor)",
    base="required",
    min_models=1,
)
def ramplus_tl(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
               ctx: MergeContext) -> torch.Tensor:
    assert base is not None  # base="required"
    eps = float(params["epsilon"])
    deltas, changed, count = _masked(base, experts, eps)
    unique, overlap = count == 1, count > 1
    shared_n = (changed & overlap).sum(1).to(deltas.dtype)
    unique_n = (changed & unique).sum(1).to(deltas.dtype)
    rho = shared_n / unique_n.clamp(min=eps)
    gain = 1.0 + float(params["r"]) * rho.clamp(0.0, float(params["alpha"]))
    merged = torch.where(overlap, deltas / count.clamp(min=1),
                         torch.where(unique, deltas * gain[:, None], deltas))
    return base + merged.sum(0).view(base.shape)
