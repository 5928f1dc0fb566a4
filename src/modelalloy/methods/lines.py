"""LiNeS — Layer-increasing Network Scaling (Wang et al., ICLR 2025, arXiv 2410.17146).

Official code ``wang-kee/LiNeS`` (``src/eval/eval.py::LiNeS_scaling``,
``src/eval/aggregation.py::create_task_vector``). Spec: datafree.md §7.

A merged task vector τ_merged (unscaled: the TA sum, TIES, or Consensus) is scaled by a
coefficient that grows linearly with depth::

    λ(ℓ) = α + β · ℓ / (L − 1),   ℓ = 0..L−1 the block index, L the number of blocks
    θ = θ_0 + λ(layer(key)) · τ_merged[key]

Tensors outside the block stack (embeddings, final norm, heads) get α, as the official code
does for every key that matches no block. The block index and L come from the tensor name
(``ctx.layer_index`` / ``ctx.num_layers``, parsed by plan/layers.py); L = 1 gives α + β.

Multi-task α (``auto_alpha``, the official multi-task setting)::

    α = (‖Σ_t τ_t‖_1 / ‖τ_merged‖_1) · (1/T)

over all merged tensors: exactly 1/T for TA; for TIES/Consensus it makes the shallow layers'
L1 norm match the average task vector's. If ‖τ_merged‖_1 = 0, α = 1/T. β is the single tuned
knob (grid 0.1..1.0 for TA/Consensus, 0.1..1.5 for TIES); 0.5 is a data-free choice, not a
paper default. Single-task editing is ``auto_alpha=false`` with β = 1 − α (one expert, TA).
"""

from __future__ import annotations

from dataclasses import dataclass
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
from modelalloy.methods.consensus import consensus_delta
from modelalloy.methods.registry import Execution, MergeContext, Param, Prepare, register_method

MERGES = ("task_arithmetic", "ties", "consensus_ta", "consensus_ties")


@dataclass(frozen=True)
class LinesStats:
    """What ``prepare`` found: the TIES thresholds (if any) and the multi-task α."""

    ties: TiesStats | None
    alpha: float
    l1_summed: float
    l1_merged: float


def layer_scale(alpha: float, beta: float, layer: int | None, num_layers: int | None) -> float:
    """λ(ℓ) = α + β·ℓ/(L−1); α outside the block stack; α + β when L = 1."""
    if layer is None or num_layers is None:
        return alpha
    if num_layers <= 1:
        return alpha + beta
    return alpha + beta * layer / (num_layers - 1)


def merged_task_vector(tvs: torch.Tensor, params: dict[str, Any],
                       ties: TiesStats | None) -> torch.Tensor:
    """The unscaled τ_merged of one tensor for the chosen base merge."""
    merge = params["merge"]
    if merge == "task_arithmetic":
        return tvs.sum(dim=0)
    if merge == "ties":
        return ties_delta(tvs, params["density"], params["ties_agg"], ties)
    return consensus_delta(tvs, base_merge="ties" if merge == "consensus_ties"
                           else "task_arithmetic", k=params["k"],
                           lambdas=params["mask_lambda"], density=params["density"],
                           stats=ties)


def _prepare(groups: GroupsFactory) -> LinesStats | None:
    first = next(iter(groups()), None)
    if first is None:
        return None
    params = first.params
    check_scope(params["scope"])
    uses_ties = params["merge"] in ("ties", "consensus_ties")
    ties = (ties_prepare(groups, params["density"])
            if uses_ties and params["scope"] == "global" else None)
    if not params["auto_alpha"]:
        return LinesStats(ties=ties, alpha=params["alpha"], l1_summed=0.0, l1_merged=0.0)
    l1_sum = 0.0
    l1_merged = 0.0
    n_tasks = len(first.experts)
    for g in groups():
        tvs = stack_task_vectors(need_base(g.base, "lines", g.name), g.experts)
        # float64 accumulation: the L1 norm of a whole model overflows fp32 precision.
        l1_sum += float(tvs.sum(dim=0).abs().sum(dtype=torch.float64))
        l1_merged += float(merged_task_vector(tvs, params, ties).abs().sum(dtype=torch.float64))
    alpha = (l1_sum / l1_merged) / n_tasks if l1_merged > 0 else 1.0 / n_tasks
    return LinesStats(ties=ties, alpha=alpha, l1_summed=l1_sum, l1_merged=l1_merged)


@register_method(
    name="lines",
    params=[
        Param("merge", str, "task_arithmetic", "the merged task vector LiNeS scales "
              "(unscaled): task arithmetic sum, TIES, or Consensus on TA/TIES", choices=MERGES),
        Param("beta", float, 0.5, "β: extra scaling of the last block over the first (tuned "
              "on validation in the paper; 0.5 is a data-free choice)"),
        Param("auto_alpha", bool, True, "multi-task α = (‖Σ τ_t‖₁/‖τ_merged‖₁)/T computed over "
              "the whole model (official); false uses `alpha`"),
        Param("alpha", float, 1.0, "α when auto_alpha is false (single-task editing: α with "
              "β = 1 − α)"),
        Param("density", float, 0.2, "TIES/Consensus-TIES: fraction of each task vector kept",
              gt=0.0, le=1.0),
        Param("ties_agg", str, "mean", "TIES disjoint aggregation: dis-mean (the LiNeS "
              "repo's ties.yaml, agg: mean) or dis-sum; consensus_ties always uses dis-sum",
              choices=("sum", "mean")),
        Param("scope", str, "global", "TIES trim thresholds over the whole model (official) or "
              "per tensor", choices=SCOPES),
        Param("k", int, 2, "Consensus: keep coordinates used by at least k tasks", ge=0),
        Param("mask_lambda", float, 0.6, "Consensus: λ_t of the TALL masks", per_model=True,
              ge=0.0),
    ],
    paper="Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances "
          "Model Merging, ICLR 2025 (arXiv 2410.17146)",
    summary="Scale a merged task vector linearly with depth: α at the first block (and outside "
            "the blocks), α + β at the last",
    base="required",
    execution=Execution(prepare=Prepare(_prepare)),
    uniform=True,
)
def lines(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
          ctx: MergeContext) -> torch.Tensor:
    """θ = θ_0 + (α + β·ℓ/(L−1)) · τ_merged.

    Needs beyond one tensor: the block index ℓ and block count L from the tensor name, and
    (``auto_alpha``) two whole-model L1 norms computed in ``prepare``; TIES in global scope
    also needs whole-model trim thresholds. Defaults: merge=task_arithmetic, β=0.5, auto α.
    """
    base = need_base(base, "lines", ctx.name)
    stats: LinesStats | None = ctx.global_stats
    if stats is None:
        if params["auto_alpha"]:
            raise MethodError("lines: auto_alpha needs the prepare pass (whole-model L1 norms); "
                              "run it through merge_state_dicts or a recipe")
        stats = LinesStats(ties=None, alpha=params["alpha"], l1_summed=0.0, l1_merged=0.0)
    tvs = stack_task_vectors(base, experts)
    tau = merged_task_vector(tvs, params, stats.ties)
    scale = layer_scale(stats.alpha, params["beta"], ctx.layer_index, ctx.num_layers)
    return base + scale * tau
