"""OTA merging and Fast Fisher Grafting — Mahdavinia et al., "Harnessing Optimization Dynamics
for Curvature-Informed Model Merging", 2025 (reference: pmahdavi/ota-merge,
``mergekit/merge_methods/ota.py``, ``ffg.py``).

Each expert ships the final Adam second moments ``v_k`` (``exp_avg_sq``) of its fine-tuning run:
a free diagonal curvature (Fisher) proxy. Per tensor:

- optional compression of v (2-D only): ``rank1`` — the AdaFactor lemma v ≈ r cᵀ / Σv with r, c
  the row and column sums; or a rank-r SVD reconstruction passed through ReLU (``rank`` > 0);
- FFG mask: M_k = [v_k ⊙ τ_k² ≥ t_k] with a base, [v_k ≥ t_k] without (t_k = per-model
  ``threshold``; 0 keeps everything);
- weights: P_k = v_k^p · s_k (p = ``power``, s_k = per-model ``weight``), divided by mean(P_k)
  when ``normalise`` = "global", plus ε; W_k = P_k ⊙ M_k;
- with a base: θ* = θ₀ + Σ_k W_k τ_k / Σ_k W_k (masked entries count in neither sum); without:
  θ* = Σ_k W_k θ_k / Σ_k W_k;
- where Σ_k W_k ≤ 1.1·K·ε (everything masked, or no curvature anywhere): θ₀ if
  ``fallback_to_base`` (default) else the plain average.

``merge`` = "linear" replaces the curvature weighting by the mean of the masked task vectors
(the reference's "linear" alternative after masking). Not implemented: the reference's "ties"
alternative and the hybrid-norm ``rescale`` option.

Defaults follow the paper's configs: p = 0.5, ε = 1e-26 (v is ~1e-18 for LLM SFT runs; the
code's default is 1e-8 — set ε relative to your v), normalise none, fallback to base.

``ffg`` is standalone Fast Fisher Grafting of one expert onto its base: keep the ``density``
fraction of entries with the largest saliency v⊙τ² (``metric`` = "fisher") or |τ|
("magnitude") in each tensor, θ = θ₀ + τ ⊙ M.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.errors import MethodError
from modelalloy.methods.registry import MergeContext, Param, register_method


def rank1_second_moment(v: torch.Tensor) -> torch.Tensor:
    """AdaFactor lemma: v ≈ r cᵀ / Σv, r = row sums, c = column sums (2-D tensors only)."""
    if v.dim() != 2:
        return v
    total = v.sum()
    if total <= 0:
        return torch.zeros_like(v)
    return torch.outer(v.sum(1), v.sum(0)) / total


def rank_r_second_moment(v: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank-r SVD reconstruction of v with ReLU (2-D tensors only)."""
    if v.dim() != 2 or rank <= 0 or rank >= min(v.shape):
        return v
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    return torch.relu((u[:, :rank] * s[:rank]) @ vh[:rank])


def _moments(ctx: MergeContext, n: int) -> list[torch.Tensor | None]:
    v = ctx.stats.get("exp_avg_sq")
    return list(v) if v else [None] * n


@register_method(
    name="ota",
    params=[
        Param("power", float, 0.5, "exponent p of the preconditioner P = v^p", ge=0.0),
        Param("epsilon", float, 1e-26, "ε added to the weights (set it relative to v)", ge=0.0),
        Param("normalise", str, "none", "'global': divide P_k by its mean over the tensor",
              choices=("none", "global")),
        Param("threshold", float, 0.0, "FFG threshold t_k on v⊙τ² (with a base) or v; 0 keeps "
              "every entry", per_model=True, ge=0.0),
        Param("weight", float, 1.0, "per-model scale s_k of P_k", per_model=True, ge=0.0),
        Param("fallback_to_base", bool, True, "where every model is masked: base (true) or the "
              "plain average (false)"),
        Param("compress", str, "none", "second-moment compression: 'rank1' (AdaFactor lemma) "
              "or 'none'", choices=("none", "rank1")),
        Param("rank", int, 0, "rank-r SVD compression of v with ReLU (0 = off)", ge=0),
        Param("merge", str, "ota", "after masking: curvature-weighted ('ota') or the mean of "
              "the masked task vectors ('linear')", choices=("ota", "linear")),
    ],
    paper="Mahdavinia et al., Harnessing Optimization Dynamics for Curvature-Informed Model "
          "Merging, 2025",
    summary="Adam second moments as curvature: FFG masks + curvature-weighted average",
    base="optional", min_models=1, stats=("exp_avg_sq",))
def ota(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
        ctx: MergeContext) -> torch.Tensor:
    """θ* = θ₀ + Σ W_k τ_k / Σ W_k, W_k = (v_k^p s_k + ε) ⊙ M_k. Reads
    ``ctx.stats["exp_avg_sq"]``; a tensor without moments gets the plain (task) average."""
    k_models = len(experts)
    vs = _moments(ctx, k_models)
    if all(v is None for v in vs):
        if base is None:
            return torch.stack(experts).mean(0)
        return base + torch.stack([e - base for e in experts]).mean(0)
    if any(v is None for v in vs):
        missing = [i for i, v in enumerate(vs) if v is None]
        raise MethodError(f"tensor '{ctx.name}': experts {missing} have no exp_avg_sq while "
                          "others do")
    eps = float(params["epsilon"])
    weights, updates = [], []
    for k, (v, theta) in enumerate(zip(vs, experts, strict=True)):
        v = v.to(theta.device).clamp_min(0.0)
        if params["compress"] == "rank1":
            v = rank1_second_moment(v)
        elif params["rank"] > 0:
            v = rank_r_second_moment(v, int(params["rank"]))
        tau = theta - base if base is not None else theta
        saliency = v * tau ** 2 if base is not None else v
        mask = (saliency >= float(params["threshold"][k])).to(theta.dtype)
        p = v ** float(params["power"]) * float(params["weight"][k])
        if params["normalise"] == "global":
            mean = p.mean()
            p = p / mean if mean > 0 else p
        if params["merge"] == "linear":
            p = torch.ones_like(p)
        weights.append((p + eps) * mask)
        updates.append(tau)
    w = torch.stack(weights)
    u = torch.stack(updates)
    den = w.sum(0)
    merged = (w * u).sum(0) / den.clamp_min(1e-38)
    if base is not None:
        merged = base + merged
    empty = den <= 1.1 * k_models * eps
    if params["merge"] == "linear":
        empty = den == 0
    if bool(empty.any()):
        if params["fallback_to_base"] and base is not None:
            fallback = base
        else:
            fallback = torch.stack(experts).mean(0)
        merged = torch.where(empty, fallback, merged)
    return merged


@register_method(
    name="ffg",
    params=[
        Param("density", float, 0.4, "fraction of entries kept per tensor", gt=0.0, le=1.0),
        Param("metric", str, "fisher", "saliency: 'fisher' (v⊙τ²) or 'magnitude' (|τ|)",
              choices=("fisher", "magnitude")),
    ],
    paper="Mahdavinia et al., Harnessing Optimization Dynamics for Curvature-Informed Model "
          "Merging, 2025 (Fast Fisher Grafting)",
    summary="graft the most salient part of one expert's update (v⊙τ²) onto the base",
    base="required", min_models=1, max_models=1, stats=("exp_avg_sq",))
def ffg(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
        ctx: MergeContext) -> torch.Tensor:
    """θ = θ₀ + τ ⊙ M, M keeping the top ``density`` of v⊙τ² (or |τ|) in the tensor.
    Defaults: density 0.4 (the paper keeps expert quality at 30–40%), metric fisher."""
    assert base is not None
    tau = experts[0] - base
    if params["metric"] == "fisher":
        v = _moments(ctx, 1)[0]
        if v is None:
            raise MethodError(f"tensor '{ctx.name}': ffg with metric 'fisher' needs exp_avg_sq "
                              "statistics (or use metric 'magnitude')")
        saliency = v.to(tau.device).clamp_min(0.0) * tau ** 2
    else:
        saliency = tau.abs()
    n = tau.numel()
    k = int(round(float(params["density"]) * n))
    if k >= n:
        return base + tau
    mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
    if k > 0:
        mask[torch.topk(saliency.flatten(), k).indices] = 1.0
    return base + tau * mask.reshape(tau.shape)
