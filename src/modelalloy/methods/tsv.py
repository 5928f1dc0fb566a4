"""Task Singular Vectors: TSV-M (Gargiulo et al., CVPR 2025) and a RESM-like variant.

TSV-M — "Task Singular Vectors: Reducing Task Interference in Model Merging", arXiv 2412.00081;
official code ``AntoAndGar/task_singular_vectors`` (``src/utils/TSVM_utils.py::
compute_and_sum_svd_mem_reduction``). Spec: datafree.md §10.1.

For every 2-D tensor (m, n), r = min(m, n), T tasks, k = ⌊r/T⌋:

1. τ_t = U_t diag(s_t) V_tᵀ (thin SVD); keep the top k triplets of each task.
2. U_cat = [U_1[:, :k] | … | U_T[:, :k] | 0] ∈ R^{m×r}, s_cat, V_catᵀ ∈ R^{r×n} likewise.
3. Decorrelate: U_⊥ = P_u Q_uᵀ from U_cat = P_u Σ_u Q_uᵀ (the nearest orthogonal matrix,
   orthogonal Procrustes); V_⊥ᵀ = P_v Q_vᵀ from V_catᵀ likewise.
4. τ_TSV = U_⊥ diag(s_cat) V_⊥ᵀ; θ = θ_0 + α·τ_TSV.

Tensors that are not 2-D, or whose name matches ``exclude`` (official: ``text_projection``),
get the **mean** (1/T)Σ_t τ_t, also scaled by α. k = 0 (T > r) gives a zero update for that
tensor, as the official code. Per tensor: nothing beyond one tensor is needed.

``orthogonalize="eigh"`` is the official TSVM_2 variant: U_cat (U_catᵀU_cat)^{-1/2} through an
eigendecomposition (1/(√|λ|+1e-12)), the same polar factor when U_cat has full column rank.

RESM / R-TSVM (Yang et al., arXiv 2502.06876) adds outlier weighting and sparsity-aware rank
selection to TSV-M. Its formulas could not be recovered (no code, method section not available;
uncertain-resolved.md §1), so ``resm`` implements the spec's candidate hooks and is
**RESM-like**, not the paper's method:

- outlier weighting: entries of τ_t whose robust z-score |τ − median|/(1.4826·MAD) exceeds
  ``outlier_z`` are clipped to median ± outlier_z·1.4826·MAD (per tensor and expert);
- sparsity-aware rank: k_t = ⌊ρ·r·d_t / Σ_s d_s⌋ with d_t the fraction of entries of τ_t with
  |τ| > ``sparsity_eps``·max|τ_t| and ρ = ``rank_budget``.

With ``outlier_z = 0`` and ``adaptive_rank = false`` RESM is exactly TSV-M.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from modelalloy.methods._taskvec import need_base, stack_task_vectors
from modelalloy.methods.registry import MergeContext, Param, register_method

ORTHO = ("svd", "eigh")


def _polar(a: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows): P Qᵀ from a = P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _inv_sqrt_gram(a: torch.Tensor) -> torch.Tensor:
    """(aᵀa)^{-1/2} via eigh, with the official 1/(√|λ| + 1e-12) guard."""
    evals, evecs = torch.linalg.eigh(a.T @ a)
    return evecs @ torch.diag(1.0 / (evals.abs().sqrt() + 1e-12)) @ evecs.T


def tsv_merge_matrix(tvs: torch.Tensor, ranks: list[int], orthogonalize: str = "svd",
                     ) -> torch.Tensor:
    """Σ-free TSV-M of one 2-D tensor: (T, m, n) task matrices, k_t components each."""
    _, m, n = tvs.shape
    r = min(m, n)
    u_cat = tvs.new_zeros(m, r)
    s_cat = tvs.new_zeros(r)
    v_cat = tvs.new_zeros(r, n)  # rows are the kept right singular vectors
    offset = 0
    for t, k in enumerate(ranks):
        k = min(k, r - offset)
        if k <= 0:
            continue
        u, s, vh = torch.linalg.svd(tvs[t], full_matrices=False)
        u_cat[:, offset:offset + k] = u[:, :k]
        s_cat[offset:offset + k] = s[:k]
        v_cat[offset:offset + k, :] = vh[:k, :]
        offset += k
    if offset == 0:
        return tvs.new_zeros(m, n)
    if orthogonalize == "eigh":
        order = torch.argsort(s_cat, stable=True)
        u_cat, s_cat, v_cat = u_cat[:, order], s_cat[order], v_cat[order, :]
        u_orth = u_cat @ _inv_sqrt_gram(u_cat)
        v_orth = (v_cat.T @ _inv_sqrt_gram(v_cat.T)).T
    else:
        u_orth = _polar(u_cat)
        v_orth = _polar(v_cat)
    return u_orth @ torch.diag(s_cat) @ v_orth


def _excluded(name: str, pattern: str) -> bool:
    return bool(pattern) and re.search(pattern, name) is not None


@register_method(
    name="tsv_m",
    params=[
        Param("lambda", float, 1.0, "α: θ = θ_0 + α·τ_TSV (official grid 0.1..3.0 on "
              "validation; 1.0 is FusionBench's data-free default)"),
        Param("exclude", str, "text_projection", "regex: 2-D tensors whose name matches get "
              "the mean task vector instead of the SVD merge (e.g. 'embed_tokens|lm_head' for "
              "LLMs, where those SVDs are large)"),
        Param("orthogonalize", str, "svd", "polar factor by SVD (TSVM) or by eigh whitening "
              "(TSVM_2)", choices=ORTHO),
        Param("min_rank_one", bool, False, "keep at least one component per task when T > r "
              "(official: k = 0, the tensor gets no update)"),
    ],
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
          "Merging, CVPR 2025 (arXiv 2412.00081)",
    summary="Per-layer SVD of the task matrices, top 1/T of each, decorrelated by orthogonal "
            "Procrustes, reconstructed with the original singular values",
    base="required",
    aliases=("tsvm", "task_singular_vectors"),
)
def tsv_m(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
          ctx: MergeContext) -> torch.Tensor:
    """θ = θ_0 + α·U_⊥ diag(s_cat) V_⊥ᵀ (2-D), θ_0 + α·mean_t τ_t (other tensors).

    Per tensor; needs nothing beyond the tensor. Defaults: α=1, k=⌊r/T⌋, polar factor by SVD.
    """
    base = need_base(base, "tsv_m", ctx.name)
    tvs = stack_task_vectors(base, experts)
    if base.dim() != 2 or _excluded(ctx.name, params["exclude"]):
        return base + params["lambda"] * tvs.mean(dim=0)
    k = min(base.shape) // len(experts)
    if params["min_rank_one"]:
        k = max(k, 1)
    merged = tsv_merge_matrix(tvs, [k] * len(experts), params["orthogonalize"])
    return base + params["lambda"] * merged


def clip_outliers(t: torch.Tensor, z: float) -> torch.Tensor:
    """Winsorise entries whose robust z-score |x − median|/(1.4826·MAD) exceeds ``z``."""
    if z <= 0 or t.numel() < 2:
        return t
    flat = t.flatten()
    med = flat.median()
    mad = (flat - med).abs().median()
    if float(mad) == 0.0:
        return t
    half = z * 1.4826 * mad
    return t.clamp(min=med - half, max=med + half)


def adaptive_ranks(tvs: torch.Tensor, budget: float, eps: float) -> list[int]:
    """k_t = ⌊ρ·r·d_t/Σ d_s⌋, d_t = fraction of |τ_t| > eps·max|τ_t| (RESM-like hook B)."""
    r = min(tvs.shape[1:])
    dens = []
    for t in range(tvs.shape[0]):
        a = tvs[t].abs()
        top = float(a.max())
        dens.append(float((a > eps * top).float().mean()) if top > 0 else 0.0)
    total = sum(dens)
    if total == 0:
        return [0] * len(dens)
    return [int(budget * r * d / total) for d in dens]


@register_method(
    name="resm",
    params=[
        Param("lambda", float, 1.0, "α: θ = θ_0 + α·τ_merged, as TSV-M"),
        Param("outlier_z", float, 3.0, "robust z-score above which task-vector entries are "
              "clipped (0 disables; RESM-like hook, not the paper's formula)", ge=0.0),
        Param("adaptive_rank", bool, True, "sparsity-aware rank: k_t ∝ the density of τ_t in "
              "this layer (false: TSV-M's ⌊r/T⌋)"),
        Param("rank_budget", float, 1.0, "ρ: Σ_t k_t = ρ·r", gt=0.0, le=1.0),
        Param("sparsity_eps", float, 0.01, "an entry counts as non-negligible if |τ| > "
              "eps·max|τ|", gt=0.0, lt=1.0),
        Param("exclude", str, "text_projection", "regex: 2-D tensors merged by the mean"),
    ],
    paper="Yang et al., Mix Data or Merge Models? Balancing the Helpfulness, Honesty, and "
          "Harmlessness of Large Language Model via Model Merging, NeurIPS 2025 "
          "(arXiv 2502.06876); RESM-like: the paper's two formulas were not available",
    summary="TSV-M with outlier clipping of the task vectors and sparsity-adaptive per-task "
            "ranks (RESM-like hooks; TSV-M when both are off)",
    base="required",
    aliases=("r_tsvm",),
)
def resm(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
         ctx: MergeContext) -> torch.Tensor:
    """RESM-like TSV-M: τ̃_t = clip(τ_t), k_t from layer sparsity, then TSV-M on τ̃.

    Per tensor. The outlier clipping also applies to the mean used for non-2-D tensors.
    """
    base = need_base(base, "resm", ctx.name)
    tvs = stack_task_vectors(base, experts)
    tvs = torch.stack([clip_outliers(tvs[t], params["outlier_z"]) for t in range(len(experts))])
    if base.dim() != 2 or _excluded(ctx.name, params["exclude"]):
        return base + params["lambda"] * tvs.mean(dim=0)
    if params["adaptive_rank"]:
        ranks = adaptive_ranks(tvs, params["rank_budget"], params["sparsity_eps"])
    else:
        ranks = [min(base.shape) // len(experts)] * len(experts)
    return base + params["lambda"] * tsv_merge_matrix(tvs, ranks)
