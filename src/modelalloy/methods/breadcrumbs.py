"""Model Breadcrumbs: drop both magnitude tails of each task vector, then sum.

``breadcrumbs`` / ``breadcrumbs_ties`` — Davari & Belilovsky, "Model Breadcrumbs: Scaling
Multi-Task Model Merging with Sparse Masks", ECCV 2024 (arXiv 2312.06795); official code
rezazzr/breadcrumbs (``TaskVectorMiddleKeep``).

Per task vector τ_t and row (last dimension, n entries; ``granularity: row``, the official
code): zero the n_top = int(n·gamma) largest |τ|, keep the next n_keep = int(n·density), zero
the rest — the kept band is magnitude ranks n_top+1 .. n_top+n_keep. Then

    breadcrumbs:       θ = θ_0 + λ Σ_t w_t mask_t ⊙ τ_t        (÷ Σ w_t with ``normalize``)
    breadcrumbs_ties:  TIES sign election and disjoint sum (or mean) of the masked τ_t, × λ.

0-D tensors are left whole; 1-D tensors are a single row. Parameters use mergekit's names:
``density`` (the paper's/official ``top_k_keep``, β) and ``gamma`` (``top_k_remove``, the top
fraction removed); official search ranges β ∈ [0.05, 0.2], γ ∈ [0.001, 0.01], α = λ ∈ [0.01, 1].

Defaults: ``density`` 1.0 and ``gamma`` 0.01 (mergekit's; the paper's regime is about
density 0.1), ``lambda`` 1, ``normalize`` false, ``granularity`` tensor and ``vote``
weighted (mergekit's; ``conventions: paper`` makes them row and paper).

``granularity: tensor`` is mergekit's ``magnitude_outliers``: the whole flattened tensor,
density ≥ 1 leaves it untouched, n_top shrinks when density + gamma > 1, and equal magnitudes
rank as in its stable ascending sort. mergekit keeps nothing when n_top = int(gamma·numel) is
0 (tensors under 1/gamma entries: its slice ``[n_bot:-0]`` is empty), which is a bug this does
not copy. The official row mode always removes the top γ of each row, so with density 1 it
still drops the outliers. Rows shorter than 1/γ lose nothing at the top.
``rescale: true`` (mergekit, default false) scales each masked task vector back to its
original L1 norm per tensor.

Execution: row masks stream band by band of whole rows (fused kernels in
``kernels.rowwise``); tensor-wide masks stream slice by slice after two passes that find each
model's two cut-off magnitudes and the ties at them (``orderstats.SlicedBand``), with the
whole tensor's bits (fused kernels in ``kernels.bands``). With ``rescale`` the tensor is
merged whole.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from modelalloy.methods._sparsify import (
    INT8_MASK,
    Scratch,
    band_trim_,
    combine_,
    density_param,
    l1_rescaled_,
    lambda_param,
    normalize_param,
    rescale_l1_param,
    task_vectors,
    vote_param,
    weight_param,
)
from modelalloy.methods.orderstats import SlicedBand
from modelalloy.methods.registry import (
    Execution,
    FusedKernel,
    MergeContext,
    Param,
    Shape,
    register_method,
)
from modelalloy.methods.ties import PAPER_VOTE, paper_vote_rows, ties_core, whole_if_negative

PAPER = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)"

_COMMON = [
    weight_param(),
    density_param(1.0, "fraction of each row kept below the removed outliers (β, top_k_keep)"),
    Param("gamma", float, 0.01, "fraction of largest-|τ| entries removed (top_k_remove)",
          per_model=True, ge=0.0, le=1.0),
    lambda_param(),
    Param("granularity", str, "tensor",
          "row: per row along the last dimension (official); tensor: whole tensor (mergekit)",
          choices=("row", "tensor"), paper_default="row"),
    normalize_param(False),
    rescale_l1_param(),
    INT8_MASK,
]


def _per_row(params: dict[str, Any]) -> bool:
    """Row masks with no per-tensor rescale: each output row depends on its input rows only."""
    return params["granularity"] == "row" and not params["rescale"]


def _tensor_wide(params: dict[str, Any]) -> bool:
    """A tensor-wide mask with no per-tensor rescale: elementwise once the two cut-offs of
    each model's band are known (two passes over the slices)."""
    return params["granularity"] == "tensor" and not params["rescale"]


def _sliced(params: dict[str, Any]) -> bool:
    """Either sliced case (the fused kernels serve both): no per-tensor L1 rescale."""
    return not params["rescale"]


def _shape(params: dict[str, Any]) -> Shape:
    """Row masks stream by rows, a tensor-wide mask by any slices; the L1 rescale (a
    whole-tensor norm) merges the tensor whole."""
    return "rowwise" if _per_row(params) else "elementwise" if _tensor_wide(params) else "whole"


def _count_band(base: torch.Tensor | None, experts: list[torch.Tensor],
                params: dict[str, Any], ctx: MergeContext) -> None:
    """First pass of a tensor-wide sliced merge: the |τ_t| histograms of this slice."""
    band = ctx.state(SlicedBand, lambda: SlicedBand(params["density"], params["gamma"]))
    for t, e in enumerate(experts):
        band.count(t, torch.sub(e, cast(torch.Tensor, base)))


def _collect_band(base: torch.Tensor | None, experts: list[torch.Tensor],
                  params: dict[str, Any], ctx: MergeContext) -> None:
    """Second pass: the |τ_t| of this slice in the bins that hold the band's cut-offs."""
    band = ctx.state(SlicedBand)
    for t, e in enumerate(experts):
        band.collect(t, torch.sub(e, cast(torch.Tensor, base)))


def _band_passes(params: dict[str, Any]) -> tuple:
    return (_count_band, _collect_band) if _tensor_wide(params) else ()


def breadcrumb_deltas(base: torch.Tensor, experts: list[torch.Tensor],
                      params: dict[str, Any], scratch: Scratch | None = None,
                      ctx: MergeContext | None = None) -> list[torch.Tensor]:
    deltas = task_vectors(base, experts)
    granularity = params["granularity"]
    if ctx is not None and ctx.slice_start is not None and _tensor_wide(params):
        band = ctx.state(SlicedBand)  # the slices come in order: the tie counts run on
        for t, d in enumerate(deltas):
            band.trim_(t, d)
        return deltas
    for d, density, gamma in zip(deltas, params["density"], params["gamma"], strict=True):
        l1_rescaled_(d, lambda x, a=density, b=gamma: band_trim_(x, a, b, granularity, scratch),  # type: ignore[misc]
                     params["rescale"])
    return deltas


@register_method(
    name="breadcrumbs",
    paper_settings={"density": 0.9},
    params=_COMMON,
    paper=PAPER,
    summary="Drop the largest and smallest task-vector entries per row, add the weighted sum",
    base="required",
    execution=Execution(shape=_shape, passes=_band_passes,
                        kernel=FusedKernel("breadcrumbs", when=_sliced)),
)
def breadcrumbs(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
                ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    deltas = breadcrumb_deltas(base, experts, params, Scratch(base), ctx)
    merged = combine_(deltas, params["weight"], sign=None, normalize=params["normalize"])
    return merged.mul_(float(params["lambda"])).add_(base)


@register_method(
    name="breadcrumbs_ties",
    paper_settings={"density": 0.9},
    params=[*_COMMON, vote_param("paper")],
    paper=PAPER,
    summary="Breadcrumbs masks, then TIES sign election and disjoint merge",
    base="required",
    execution=Execution(shape=whole_if_negative(_shape), passes=_band_passes, finish=PAPER_VOTE,
                        kernel=FusedKernel("breadcrumbs_ties", when=_sliced)),
)
def breadcrumbs_ties(base: torch.Tensor | None, experts: list[torch.Tensor],
                     params: dict[str, Any], ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    scratch = Scratch(base)
    deltas = breadcrumb_deltas(base, experts, params, scratch, ctx)
    if ctx.slice_start is not None and params["vote"] == "paper":
        # zero sums take the tensor's majority sign, settled after the last band
        return paper_vote_rows(base, deltas, params, ctx)
    return ties_core(deltas, params, vote=params["vote"], scratch=scratch).add_(base)
