"""DELLA: magnitude-ranked random drop (MagPrune), then TIES election or a linear sum.

``della`` / ``della_linear`` — Deep, Bhardwaj, Majumder, Poria, "DELLA-Merging: Reducing
Interference in Model Merging through Magnitude-Based Sampling", arXiv 2406.11617 (2024);
official code declare-lab/della (a mergekit fork, ``rank_magnitude``).

Per task vector δ = θ_t − θ_0 and row (last dimension; 1-D tensors are one row): rank |δ|
ascending, r = 0..n−1, and keep each entry with probability

    π = (density − ε) + 2ε · r/(n−1),       δ̃ = δ ⊙ m / π,   m ~ Bernoulli(π)

so the smallest entry is kept with density − ε, the largest with density + ε, and E[δ̃] = δ.
Then ``della``: TIES election (``vote: weighted`` by default, the official fork's sign of the
weighted sum, zero sums +), disjoint weighted mean (``normalize: true``), θ = θ_0 + λ·merged;
``della_linear``: θ = θ_0 + λ Σ_t w_t δ̃_t (÷ Σ w_t with ``normalize``).

Parameter mapping: ``density`` = 1 − drop_rate, ``epsilon`` = window_size / 2. Official README
setting: density 0.7, epsilon 0.07, lambda 1.1. Defaults here: ``density`` 1.0 (no drop, as in
mergekit), ``epsilon`` 0.15 (mergekit), ``lambda`` 1, ``rescale`` true with
``rescale_norm: l1`` (current mergekit; ``conventions: paper`` makes it ``probability``, the
per-element 1/π of the official code). 0 < density ± ε < 1 is required when density < 1. A row
of one entry is kept with probability ``density``. Masks are seeded per (seed, tensor, model).

Ranks are per row and the draws continue row after row, so a large tensor streams a band of
whole rows at a time (``rowwise``) with the same masks and bits as the whole-tensor merge —
except with ``rescale_norm: l1`` (a whole-tensor norm), which merges the whole tensor. The
paper vote's zero sums, which take the tensor's majority sign, are settled after the last band
(``ties.finish_paper_vote``, as for dare_ties). With numba the
bands go through fused kernels (``kernels.rowwise.della_kernel``/``della_sum_kernel``: the same
ranks, draws and float32 steps, so the same bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from modelalloy.errors import MethodError
from modelalloy.methods._sparsify import (
    INT8_MASK,
    combine_,
    density_param,
    lambda_param,
    magprune_,
    normalize_param,
    task_vectors,
    vote_param,
    weight_param,
)
from modelalloy.methods.registry import (
    Execution,
    FusedKernel,
    MergeContext,
    Param,
    Shape,
    register_method,
)
from modelalloy.methods.ties import PAPER_VOTE, paper_vote_rows, ties_core, whole_if_negative

PAPER = "Deep et al., DELLA-Merging, arXiv 2406.11617 (2024)"

_COMMON = [
    weight_param(),
    density_param(1.0, "mean keep probability (1 − drop_rate)"),
    Param("epsilon", float, 0.15, "half-width of the keep-probability window (window_size/2)",
          per_model=True, ge=0.0, lt=0.5),
    lambda_param(),
    Param("rescale", bool, True, "rescale the kept entries"),
    Param("rescale_norm", str, "l1",
          "probability: divide each kept entry by its keep probability (official); l1: match "
          "the original L1 norm (current mergekit)", choices=("probability", "l1"),
          paper_default="probability"),
    INT8_MASK,
]


def _shape(params: dict[str, Any]) -> Shape:
    """Row-ranked masks, per-element 1/π, then TIES or a sum: each output row depends on its
    input rows only (the L1 rescale is a whole-tensor norm), so the engine may stream whole
    rows; the paper vote's zero sums are settled after the last band (``PAPER_VOTE``)."""
    return "whole" if params["rescale"] and params["rescale_norm"] == "l1" else "rowwise"


def check_epsilon(densities: Sequence[float], epsilons: Sequence[float], where: str) -> None:
    """DELLA needs 0 < density ± epsilon < 1 for every pruned model (the torch path checks it
    per tensor, the fused kernels when they are made)."""
    for i, (d, e) in enumerate(zip(densities, epsilons, strict=True)):
        if d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
            raise MethodError(f"{where}: parameter 'epsilon' = {e} with density {d} (model {i}) "
                              "gives keep probabilities outside (0, 1); choose epsilon < "
                              "min(density, 1 − density)")


def della_deltas(base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any],
                 ctx: MergeContext) -> list[torch.Tensor]:
    check_epsilon(params["density"], params["epsilon"], f"tensor '{ctx.name}'")
    deltas = task_vectors(base, experts)
    per_model = zip(deltas, params["density"], params["epsilon"], strict=True)
    for i, (d, density, eps) in enumerate(per_model):
        magprune_(d, density, eps, ctx, i, rescale=params["rescale"],
                  rescale_norm=params["rescale_norm"])
    return deltas


@register_method(
    name="della",
    params=[*_COMMON, normalize_param(True), vote_param(paper_default="weighted")],
    paper=PAPER,
    summary="Magnitude-ranked random drop (MagPrune), TIES sign election, disjoint mean",
    base="required",
    execution=Execution(shape=whole_if_negative(_shape), finish=PAPER_VOTE,
                        kernel=FusedKernel("della")),
)
def della(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
          ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    deltas = della_deltas(base, experts, params, ctx)
    if ctx.slice_start is not None and params["vote"] == "paper":
        return paper_vote_rows(base, deltas, params, ctx)
    return ties_core(deltas, params, vote=params["vote"]).add_(base)


@register_method(
    name="della_linear",
    params=[*_COMMON, normalize_param(False)],
    paper=PAPER,
    summary="Magnitude-ranked random drop (MagPrune), then the weighted sum of task vectors",
    base="required",
    execution=Execution(shape=_shape, kernel=FusedKernel("della_linear")),
)
def della_linear(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
                 ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    deltas = della_deltas(base, experts, params, ctx)
    merged = combine_(deltas, params["weight"], sign=None, normalize=params["normalize"])
    return merged.mul_(float(params["lambda"])).add_(base)
