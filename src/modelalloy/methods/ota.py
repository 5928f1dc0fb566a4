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

``merge`` chooses how the masked task vectors τ̂_k = τ_k ⊙ M_k are combined (the reference's
``masked_task_vector_merge_method``: precond | linear | ties):

- "ota" (default, the reference's "precond"): the curvature-weighted average above;
- "linear": the mean of the masked task vectors;
- "ties": TIES on the masked task vectors (needs a base) — optional trim of each τ̂_k to its
  largest-|·| ``ties_density`` fraction per tensor (1 = no trim, the default: FFG has already
  sparsified), elected sign γ = sign(Σ_k τ̂_k) (zero sums take the tensor's majority sign), then
  the mean of the entries that agree strictly with γ (zeros never count):
  θ* = θ₀ + Σ_k [τ̂_k γ > 0] τ̂_k / max(1, Σ_k [τ̂_k γ > 0]). The curvature enters only through
  the FFG mask; ``power``, ``weight``, ``normalise`` and ``epsilon`` are not used. Where every
  model is masked the update is 0 (θ₀); with ``fallback_to_base`` false, the plain average.

Not implemented: the hybrid-norm ``rescale`` option.

Defaults follow the paper's configs: p = 0.5, ε = 1e-26 (v is ~1e-18 for LLM SFT runs; the
code's default is 1e-8 — set ε relative to your v), normalise none, fallback to base.

``ffg`` is standalone Fast Fisher Grafting of one expert onto its base: keep the ``density``
fraction of entries with the largest saliency v⊙τ² (``metric`` = "fisher") or |τ|
("magnitude") in each tensor, θ = θ₀ + τ ⊙ M.
"""

from __future__ import annotations

from typing import Any, cast

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


def _compressed(v: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """v clamped at 0, then rank-1 or rank-r compressed as the parameters ask."""
    v = v.clamp_min(0.0)
    if params["compress"] == "rank1":
        return rank1_second_moment(v)
    if params["rank"] > 0:
        return rank_r_second_moment(v, int(params["rank"]))
    return v


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
        Param("merge", str, "ota", "after masking: curvature-weighted ('ota'), the mean of "
              "the masked task vectors ('linear') or TIES on them ('ties')",
              choices=("ota", "linear", "ties")),
        Param("ties_density", float, 1.0, "merge 'ties': fraction of each masked task vector "
              "kept by magnitude before the sign election (1 = no trim)", gt=0.0, le=1.0),
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
    if params["merge"] == "ties":
        return _ota_ties(base, experts, vs, params, ctx)
    eps = float(params["epsilon"])
    weights, updates = [], []
    for k, (v, theta) in enumerate(zip(vs, experts, strict=True)):
        v = _compressed(cast(torch.Tensor, v).to(theta.device), params)
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


def _ota_ties(base: torch.Tensor | None, experts: list[torch.Tensor],
              vs: list[torch.Tensor | None], params: dict[str, Any],
              ctx: MergeContext) -> torch.Tensor:
    """TIES (optional trim, sign election, disjoint mean) on the FFG-masked task vectors."""
    from modelalloy.methods._sparsify import combine_, elect_sign, magnitude_trim_

    if base is None:
        raise MethodError(f"tensor '{ctx.name}': ota with merge 'ties' needs a base model")
    base32 = base.float()
    deltas, masks = [], []
    for k, (v, theta) in enumerate(zip(vs, experts, strict=True)):
        tau = theta.float() - base32
        assert v is not None
        v = _compressed(v.to(tau.device).float(), params)
        mask = v * tau ** 2 >= float(params["threshold"][k])
        masks.append(mask)
        deltas.append(tau.mul_(mask))
    density = float(params["ties_density"])
    if density < 1.0:
        for d in deltas:
            magnitude_trim_(d, density)
    ones = [1.0] * len(deltas)
    sign = elect_sign(deltas, ones, "paper")
    merged = base32 + combine_(deltas, ones, sign=sign, normalize=True)
    if not params["fallback_to_base"]:
        none = ~torch.stack(masks).any(0)
        if bool(none.any()):
            merged = torch.where(none, torch.stack([e.float() for e in experts]).mean(0),
                                 merged)
    return merged.to(base.dtype)


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
