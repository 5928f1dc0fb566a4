"""TALL masks and Consensus Merging (Wang, Dimitriadis et al., ICML 2024).

"Localizing Task Information for Improved Model Merging and Compression", arXiv 2405.07813;
official code ``nik-dim/tall_masks`` (``src/utils/tallmask_utils.py``,
``src/eval/aggregation.py``). Spec: datafree.md §8.

1. τ_MTL, **unscaled**: the task-arithmetic sum Σ_t τ_t, or TIES (trim to the top ``density``,
   elect, ``dis-sum``) of the τ_t.
2. TALL mask of task t: m_t = 1[ |τ_t| > λ_t · |τ_MTL − τ_t| ]  (strict >, as the code; the
   paper writes ≥). Coordinates where τ_t = 0 are never in m_t.
3. Expert t is rebuilt as θ̂_t = θ_0 + m_t ⊙ τ_MTL (see :mod:`modelalloy.bundle`).
4. Consensus mask c = 1[ Σ_t m_t ≥ k ]; the merged model is θ_0 + α · (c ⊙ τ_MTL).

Everything is elementwise, so it streams tensor by tensor; only the TIES variant with
``scope="global"`` (the official default) needs whole-model trim thresholds, computed in
``prepare``. k = 0 gives plain TA/TIES (dis-sum); k > T gives θ_0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modelalloy.errors import MethodError
from modelalloy.methods._taskvec import (
    SCOPES,
    GroupsFactory,
    TiesStats,
    check_scope,
    need_base,
    stack_task_vectors,
    ties_delta,
    ties_prepare,
)
from modelalloy.methods.registry import Execution, MergeContext, Param, Prepare, register_method

BASE_MERGES = ("task_arithmetic", "ties")


def multitask_vector(tvs: torch.Tensor, base_merge: str, density: float,
                     stats: TiesStats | None) -> torch.Tensor:
    """τ_MTL of one tensor, unscaled: Σ_t τ_t, or TIES with ``dis-sum``."""
    if base_merge == "task_arithmetic":
        return tvs.sum(dim=0)
    return ties_delta(tvs, density, "sum", stats)


def tall_masks(tvs: torch.Tensor, mtl: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """Boolean TALL masks, shape (T, *shape): |τ_t| > λ_t · |τ_MTL − τ_t|."""
    lam = torch.tensor(lambdas, dtype=tvs.dtype, device=tvs.device)
    lam = lam.view(-1, *([1] * (tvs.dim() - 1)))
    return tvs.abs() > lam * (mtl.unsqueeze(0) - tvs).abs()


def consensus_delta(tvs: torch.Tensor, *, base_merge: str, k: int, lambdas: list[float],
                    density: float, stats: TiesStats | None) -> torch.Tensor:
    """c ⊙ τ_MTL for one tensor, unscaled (c = tasks using the coordinate >= k)."""
    mtl = multitask_vector(tvs, base_merge, density, stats)
    if k <= 0:
        return mtl
    counts = tall_masks(tvs, mtl, lambdas).sum(dim=0)
    return mtl * (counts >= k).to(mtl.dtype)


def check_mtl_options(base_merge: str, scope: str) -> None:
    """How τ_MTL is built: ``base_merge`` in :data:`BASE_MERGES`, TIES ``scope`` global or per
    tensor (for callers that take them as arguments rather than recipe parameters)."""
    if base_merge not in BASE_MERGES:
        raise MethodError(f"base_merge must be one of {', '.join(BASE_MERGES)}")
    check_scope(scope)


def ties_stats(groups: GroupsFactory, params: Mapping[str, Any]) -> TiesStats | None:
    """The whole-model TIES statistics τ_MTL needs: only for ``base_merge="ties"`` with
    ``scope="global"`` (None otherwise); ``params`` holds base_merge, scope and density."""
    if params["base_merge"] != "ties" or params["scope"] != "global":
        return None
    return ties_prepare(groups, params["density"])


def _prepare(groups: GroupsFactory) -> TiesStats | None:
    first = next(iter(groups()), None)
    if first is None:
        return None
    check_scope(first.params["scope"])
    return ties_stats(groups, first.params)


# the parameters of the whole-model TIES pass (the planner checks them)
UNIFORM = ("base_merge", "density", "scope")

_COMMON = [
    Param("base_merge", str, "task_arithmetic", "how τ_MTL is built: the task-arithmetic sum "
          "or TIES with dis-sum", choices=BASE_MERGES),
    Param("mask_lambda", float, 0.6, "λ_t of the TALL mask |τ_t| > λ_t·|τ_MTL − τ_t| (the "
          "paper picks it per task from {0.2..0.6} on validation; 0.6 is FusionBench's "
          "data-free default)", per_model=True, ge=0.0),
    Param("density", float, 0.2, "TIES only: fraction of each task vector kept by the trim "
          "(the official reset_thresh k=20)", gt=0.0, le=1.0),
    Param("scope", str, "global", "TIES only: trim thresholds over the whole model (official) "
          "or per tensor (memory-friendly)", choices=SCOPES),
]


@register_method(
    name="consensus",
    params=[
        Param("k", int, 2, "keep coordinates used (TALL mask on) by at least k tasks; 0 is "
              "plain TA/TIES, k > T gives the base", ge=0),
        Param("lambda", float, 1.0, "α: θ = θ_0 + α·(c ⊙ τ_MTL); tuned on validation in the "
              "paper (grid 0.1..1.0)"),
        *_COMMON,
    ],
    paper="Wang, Dimitriadis et al., Localizing Task Information for Improved Model Merging "
          "and Compression, ICML 2024 (arXiv 2405.07813)",
    summary="Consensus merging: drop weights used by fewer than k tasks (TALL masks), on top "
            "of task arithmetic or TIES",
    base="required",
    execution=Execution(prepare=Prepare(_prepare)),
    uniform=UNIFORM,
    aliases=("consensus_merging",),
)
def consensus(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
              ctx: MergeContext) -> torch.Tensor:
    """θ = θ_0 + α · (1[Σ_t m_t ≥ k] ⊙ τ_MTL), m_t = 1[|τ_t| > λ_t|τ_MTL − τ_t|].

    Needs beyond one tensor: only for ``base_merge="ties"`` with ``scope="global"``, the
    whole-model TIES trim thresholds (``prepare``). Defaults: k=2, λ_t=0.6, α=1, TIES density
    0.2 (official k=20, dis-sum).
    """
    base = need_base(base, "consensus", ctx.name)
    tvs = stack_task_vectors(base, experts)
    delta = consensus_delta(tvs, base_merge=params["base_merge"], k=params["k"],
                            lambdas=params["mask_lambda"], density=params["density"],
                            stats=ctx.global_stats)
    return base + params["lambda"] * delta


@register_method(
    name="tall_masks",
    bundle=True,  # rebuilds one expert from a bundle: not a merge
    params=[
        Param("task", int, 0, "which expert to rebuild (0-based, in model order)", ge=0),
        *_COMMON,
    ],
    paper="Wang, Dimitriadis et al., Localizing Task Information for Improved Model Merging "
          "and Compression, ICML 2024 (arXiv 2405.07813)",
    summary="Rebuild one expert from the multi-task vector and its TALL mask: "
            "θ_0 + m_t ⊙ τ_MTL (for storage use `modelalloy compress`)",
    base="required",
    execution=Execution(prepare=Prepare(_prepare)),
    uniform=UNIFORM,
)
def tall_mask_expert(base: torch.Tensor | None, experts: list[torch.Tensor],
                     params: dict[str, Any], ctx: MergeContext) -> torch.Tensor:
    """θ̂_t = θ_0 + m_t ⊙ τ_MTL for t = ``task``.

    The output is one expert's reconstruction, not a multi-task model: it is what the TALL
    bundle (:mod:`modelalloy.bundle`) rebuilds, without storing the bundle. Needs beyond one
    tensor: as :func:`consensus`.
    """
    base = need_base(base, "tall_masks", ctx.name)
    task = params["task"]
    if task >= len(experts):
        from modelalloy.errors import MethodError

        raise MethodError(f"tall_masks: task={task} but only {len(experts)} experts are given")
    tvs = stack_task_vectors(base, experts)
    mtl = multitask_vector(tvs, params["base_merge"], params["density"], ctx.global_stats)
    mask = tall_masks(tvs, mtl, params["mask_lambda"])[task]
    return base + mtl * mask.to(mtl.dtype)
