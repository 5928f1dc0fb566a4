"""RegMean and RegMean++: closed-form merging of linear layers from input Gram matrices.

RegMean — Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of
Language Models", ICLR 2023 (reference: bloomberg/dataless-model-merging,
``avg_merger.py::regmean_mean_params``, ``reduce_non_diag``).

For a linear layer with transposed weights Ŵ_k = W_kᵀ (d_in × d_out) and input Grams
G_k = X_kᵀX_k, the merged weights minimise Σ_k ‖X_k Ŵ − X_k Ŵ_k‖²::

    Ŵ* = (Σ_k c_k G̃_k)⁻¹ Σ_k c_k G̃_k Ŵ_k,      G̃_k = α·G_k + (1 − α)·diag(G_k)

α scales the off-diagonal entries (α = 1: the paper's equation; α = 0: a per-input-feature
weighted average, the reference's ``regmean_diag``). c_k are optional model weights (the
reference multiplies G_k by c_k·K; the K cancels). Tensors without a Gram (biases, norms,
embeddings) get the c-weighted average.

RegMean++ — Nguyen et al. 2025 (nthehai01/RegMean-plusplus): the same closed form, but the Gram
of block l is collected on inputs produced by the *already merged* blocks 0..l-1. The statistic
kind is ``gram_pp``, produced by :func:`modelalloy.stats.regmean_pp.collect_regmean_pp_grams`
(it merges block by block in memory with this same function, so the engine reproduces its
weights exactly from the saved Grams).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from modelalloy.errors import MethodError
from modelalloy.methods.registry import MergeContext, Param, register_method

_PARAMS = [
    Param("alpha", float, 1.0, "off-diagonal scaling α of the Gram matrices (1 = plain RegMean; "
          "reference configs use 0.1 for GLUE, 0.95 for CLIP-ViT, 0.6 for GPT-2)", ge=0.0,
          le=1.0),
    Param("weight", float, 1.0, "model coefficient c_k (scales the model's Gram; weights the "
          "average of tensors without a Gram)", per_model=True, ge=0.0),
    Param("ridge", float, 0.0, "added to the diagonal of Σ G̃ as a fraction of its mean "
          "diagonal before solving (0 = none; a near-singular system gets the minimum-norm "
          "solution)",
          ge=0.0),
    Param("input_dim", str, "auto", "weight dimension the Gram runs along: 'last' (nn.Linear), "
          "'first' (GPT-2 Conv1D), or 'auto' (from the shapes; square weights count as 'last')",
          choices=("auto", "last", "first")),
]


def _weighted_average(experts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    if total <= 0:
        raise MethodError("the model weights sum to zero")
    out = torch.zeros_like(experts[0])
    for w, t in zip(weights, experts, strict=True):
        out.add_(t, alpha=w / total)
    return out


def _layout(weight: torch.Tensor, d: int, choice: str, name: str) -> str:
    if weight.dim() != 2:
        raise MethodError(f"tensor '{name}': a Gram of size {d} was given for a "
                          f"{weight.dim()}-D tensor; RegMean needs a 2-D weight")
    last_ok, first_ok = weight.shape[1] == d, weight.shape[0] == d
    if choice == "last" and last_ok:
        return "last"
    if choice == "first" and first_ok:
        return "first"
    # 'auto', or an explicit choice the shapes contradict (a mixed model): trust the shapes
    if last_ok:
        return "last"
    if first_ok:
        return "first"
    raise MethodError(f"tensor '{name}': weight of shape {tuple(weight.shape)} does not match a "
                      f"Gram of size {d}")


def reduce_non_diag(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G): off-diagonal entries scaled by α, diagonal kept."""
    if alpha == 1.0:
        return gram
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


def regmean_solve(grams: list[torch.Tensor], weights_t: list[torch.Tensor],
                  coefficients: list[float], alpha: float, ridge: float = 0.0) -> torch.Tensor:
    """(Σ c_k G̃_k)⁻¹ Σ c_k G̃_k Ŵ_k for transposed weights Ŵ_k (d_in × d_out)."""
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros_like(weights_t[0], dtype=torch.float64)
    for g, w, c in zip(grams, weights_t, coefficients, strict=True):
        gt = reduce_non_diag(g.double(), alpha) * c
        lhs += gt
        rhs += gt @ w.double()
    if ridge > 0:
        lhs += torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device) * (
            ridge * torch.diagonal(lhs).mean().clamp_min(1e-30))
    return _solve_psd(lhs, rhs)


def _solve_psd(lhs: torch.Tensor, rhs: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """Solve a symmetric PSD system; near-singular systems get the minimum-norm solution.

    Cholesky first (a Gram sum is PSD), then a cheap check of the condition number: 30 power
    iterations for the largest eigenvalue and 30 inverse iterations (through the Cholesky factor)
    for the smallest. If the factorisation fails or λ_min/λ_max < ``rcond`` (a dead input
    feature, LayerNorm outputs that sum to zero, fewer tokens than features), fall back to an
    eigendecomposition pseudo-inverse with that relative cutoff. ``rcond`` = 1e-6 because Grams
    are accumulated in float32, whose rounding noise sits near 1e-7 of the top eigenvalue.
    """
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(lhs.shape[0], 1, generator=gen, dtype=lhs.dtype).to(lhs.device)
        u = v.clone()
        lam_max = lam_inv = 0.0
        for _ in range(30):
            v = lhs @ v
            lam_max = float(v.norm())
            v = v / max(lam_max, 1e-300)
            u = torch.cholesky_solve(u, chol)
            lam_inv = float(u.norm())
            u = u / max(lam_inv, 1e-300)
        if lam_inv > 0 and (1.0 / lam_inv) > rcond * lam_max:
            return torch.cholesky_solve(rhs, chol).to(torch.float32)
    evals, evecs = torch.linalg.eigh(lhs)
    keep = evals > rcond * evals.abs().max()
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)),
                      torch.zeros_like(evals))
    return (evecs @ (inv[:, None] * (evecs.T @ rhs))).to(torch.float32)


def regmean_merge(experts: list[torch.Tensor], grams: list[torch.Tensor | None],
                  params: dict[str, Any], name: str) -> torch.Tensor:
    coeff = list(params["weight"])
    present = [g is not None for g in grams]
    if not any(present):
        return _weighted_average(experts, coeff)
    if not all(present):
        missing = [i for i, p in enumerate(present) if not p]
        raise MethodError(f"tensor '{name}': experts {missing} have no Gram matrix while others "
                          "do; collect statistics for every model")
    d = cast(torch.Tensor, grams[0]).shape[0]
    layout = _layout(experts[0], d, params["input_dim"], name)
    wts = [w.T if layout == "last" else w for w in experts]
    dev = experts[0].device  # the engine may hand statistics over on the CPU
    merged = regmean_solve([g.to(dev) for g in grams if g is not None], wts, coeff,
                           float(params["alpha"]), float(params["ridge"]))
    return merged.T.contiguous() if layout == "last" else merged


@register_method(
    name="regmean", params=_PARAMS,
    paper_settings={"alpha": 0.95},  # the reference CLIP-ViT config (FusionBench)
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    summary="closed-form least-squares merge of linear layers from input Gram matrices",
    base="none", min_models=1, stats=("gram",))
def regmean(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
            ctx: MergeContext) -> torch.Tensor:
    """RegMean: Ŵ* = (Σ_k c_k G̃_k)⁻¹ Σ_k c_k G̃_k W_kᵀ per linear layer; average elsewhere.

    Defaults: α = 1 (the paper's equation), c_k = 1, no ridge. Reads ``ctx.stats["gram"]``.
    """
    return regmean_merge(experts, ctx.stats.get("gram", [None] * len(experts)), params,
                         ctx.name)


@register_method(
    name="regmean_pp", params=_PARAMS,
    paper_settings={"alpha": 0.95},  # as RegMean's
    paper="Nguyen et al., RegMean++: Enhancing Effectiveness and Generalization of Regression "
          "Mean for Model Merging, 2025",
    summary="RegMean with Grams collected through the already-merged earlier blocks",
    base="none", min_models=1, stats=("gram_pp",), aliases=("regmean++",))
def regmean_pp(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
               ctx: MergeContext) -> torch.Tensor:
    """RegMean++: the RegMean closed form on ``gram_pp`` statistics, whose block-l Grams were
    collected on inputs from the merged blocks 0..l-1 (cross-layer dependency) and the
    candidate's own block l (intra-layer dependency). Collect them with
    :func:`modelalloy.stats.regmean_pp.collect_regmean_pp_grams`. Defaults as ``regmean``
    (the reference uses α = 0.95 for CLIP-ViT)."""
    return regmean_merge(experts, ctx.stats.get("gram_pp", [None] * len(experts)), params,
                         ctx.name)
