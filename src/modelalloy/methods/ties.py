"""TIES-Merging: trim, elect sign, disjoint merge.

``ties`` — Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When
Merging Models", NeurIPS 2023 (arXiv 2306.01708); official code prateeky2806/ties-merging.

For task vectors τ_t = θ_t − θ_0:

1. Trim: τ̂_t keeps the largest-|·| entries of τ_t (fraction ``density``).
2. Elect: γ = sign(Σ_t τ̂_t) (the paper's "mass" vote); coordinates with a zero sum take the
   majority sign sign(Σ_j γ_j).
3. Disjoint merge: A_t = [τ̂_t · γ > 0];  τ_m = Σ_t A_t w_t τ̂_t / Σ_t A_t w_t  (normalize).
4. θ = θ_0 + λ τ_m.

Parameters (mergekit names): per-model ``weight`` (default 1) and ``density`` (default 1.0 = no
trim, as in mergekit; the paper uses 0.2 — set it), global ``lambda`` (1), ``normalize`` (true:
the disjoint mean), ``vote`` and ``scope``.

``scope``:
- ``per_tensor`` (default; streaming, mergekit-compatible): each tensor keeps exactly
  int(density·numel) entries (ties at the threshold broken by index order) and zero sums take
  this tensor's majority sign.
- ``global`` (official code): the threshold is the whole model's m-th smallest |τ_t| with
  m = d − int(density·d), entries with |τ| ≥ threshold kept (ties kept, so int(density·d)+1 or
  more entries survive, as in the official code), and zero sums take the whole model's majority
  sign. Computed in the ``prepare`` pass without concatenating the model (two histogram/select
  passes, see ``_sparsify.global_thresholds``). Tied weights are counted once per tensor name
  the engine gives; deduplicating them is the engine's job.

``vote``:
- ``paper`` (default with ``conventions: paper``): the vote uses the unweighted trimmed task
  vectors; per-model weights only enter the merge (step 3). Zero sums take the majority sign.
- ``weighted`` (mergekit, the default): γ = sign(Σ_t w_t τ̂_t), a zero sum counts as +; an
  entry agrees when sign(w_t τ̂_t) = γ, so a negative weight (task negation) flips which
  entries agree, exactly as in mergekit.

With all weights equal the two votes differ only on exact zero sums. ``rescale: true``
(mergekit, default false) scales each trimmed task vector back to its original L1 norm per
tensor. Differences from mergekit: ``scope: global`` (an addition), and float32 arithmetic.
Entries of equal magnitude at the trim cut-off are kept in index order (mergekit's stable
argsort does the same on the CPU for small tensors; for large ones its order is unspecified).
``int8_mask`` is accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from modelalloy.errors import MethodError
from modelalloy.methods._sparsify import (
    INT8_MASK,
    Scratch,
    combine_,
    combine_signed,
    density_param,
    elect_sign,
    global_thresholds,
    has_negative_weight,
    l1_rescaled_,
    lambda_param,
    magnitude_trim_,
    normalize_param,
    rescale_l1_param,
    task_vectors,
    threshold_trim_,
    vote_param,
    weight_param,
)
from modelalloy.methods.orderstats import SlicedTopK
from modelalloy.methods.registry import (
    Execution,
    Finish,
    FusedKernel,
    MergeContext,
    Param,
    Prepare,
    Shape,
    TensorGroup,
    register_method,
)

SCOPE = Param("scope", str, "per_tensor",
              "where the top-k threshold is taken: per_tensor (streaming, mergekit) or global "
              "(whole model, official TIES code)", choices=("per_tensor", "global"))


def ties_prepare(groups: Callable[[], Iterator[TensorGroup]]) -> dict[str, Any] | None:
    """For ``scope: global``: each model's whole-model threshold and the majority sign."""
    first = next(iter(groups()), None)
    if first is None or first.params.get("scope") != "global":
        return None
    densities = list(first.params["density"])
    vote = first.params.get("vote", "paper")

    def check(g: TensorGroup) -> None:
        if g.params.get("scope") != "global":
            raise MethodError(f"tensor '{g.name}': parameter 'scope' must be the same for every "
                              "tensor when it is global")
        if list(g.params["density"]) != densities:
            raise MethodError(f"tensor '{g.name}': parameter 'density' must be one value per "
                              "model for the whole model with scope: global")
        if g.base is None:
            raise MethodError("method 'ties' needs a base model: set base_model in the recipe")

    return global_thresholds(groups, densities, check=check, majority=(vote == "paper"))


def ties_core(deltas: list[torch.Tensor], params: dict[str, Any], *, vote: str,
              majority: float | None = None, scratch: Scratch | None = None) -> torch.Tensor:
    """Elect and disjoint-merge already-sparsified task vectors; returns λ·τ_m.

    Consumes ``deltas`` (the caller's own task vectors): the result lives in ``deltas[0]``.
    """
    weights = params["weight"]
    lam = float(params["lambda"])
    if vote == "weighted" and any(w < 0 for w in weights):
        merged = combine_signed(deltas, weights, normalize=params["normalize"])
        return merged if lam == 1.0 else merged.mul_(lam)
    if scratch is None:
        scratch = Scratch(deltas[0])
    sign = elect_sign(deltas, weights, vote, majority, out=scratch.get("mag"))
    merged = combine_(deltas, weights, sign=sign, normalize=params["normalize"],
                      scratch=scratch)
    return merged if lam == 1.0 else merged.mul_(lam)


def _shape(params: dict[str, Any]) -> Shape:
    """Per-tensor trims without the L1 rescale stream over slices (a whole-model threshold or
    a per-tensor norm would not)."""
    streams = (params["scope"] == "per_tensor" and not params["rescale"]
               and not has_negative_weight(params))
    return "elementwise" if streams else "whole"


ShapeFn = Callable[[dict[str, Any]], Shape]


def whole_if_negative(shape: ShapeFn) -> ShapeFn:
    """``shape``, but "whole" when a negative weight is set (``has_negative_weight``): the
    sign election of a TIES variant then needs the whole tensor."""
    def ties_shape(params: dict[str, Any]) -> Shape:
        return "whole" if has_negative_weight(params) else shape(params)
    return ties_shape


def _count_slice(base: torch.Tensor | None, experts: list[torch.Tensor],
                 params: dict[str, Any], ctx: MergeContext) -> None:
    """First pass: |τ_t| histograms of this slice (``SlicedTopK.count``)."""
    trim = ctx.state(SlicedTopK, lambda: SlicedTopK(params["density"]))
    for t, e in enumerate(experts):
        trim.count(t, torch.sub(e, cast(torch.Tensor, base)))


def _collect_slice(base: torch.Tensor | None, experts: list[torch.Tensor],
                   params: dict[str, Any], ctx: MergeContext) -> None:
    """Second pass: the |τ_t| of this slice that fall in the threshold's bin."""
    trim = ctx.state(SlicedTopK)
    for t, e in enumerate(experts):
        trim.collect(t, torch.sub(e, cast(torch.Tensor, base)))


# --------------------------------------------------------------------------------------------
# Sliced merges with the paper vote (ties, dare_ties): zero sums wait for the tensor's majority


@dataclass
class PaperVote:
    """A sliced paper-vote merge's state: Σ_j γ_j over the slices so far, and per slice its
    undecided elements (flat offsets in the tensor) with their merged values under majority
    −1 and 0 (the slices were merged with +1)."""

    signs: float = 0.0
    fixes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def paper_vote_slice(base: torch.Tensor, deltas: list[torch.Tensor], params: dict[str, Any],
                      ctx: MergeContext, scratch: Scratch) -> torch.Tensor:
    """One slice of a paper-vote merge, whose zero sums take the whole tensor's majority sign
    sign(Σ_j γ_j) — known only after the last slice.

    The slice is merged with majority +1. Where it mattered (Σ_t δ̃_t = 0 with some δ̃_t ≠ 0,
    or with every δ̃_t = 0 on a base of −0.0, where the fill gives the zero's sign; elsewhere
    it is overwritten by the sign or multiplies zeros into base + ±0) the results for
    majorities −1 and 0 are kept, with Σ_j γ_j so far; :func:`finish_paper_vote` picks. The
    sum repeats :func:`elect_sign`'s operations, so γ is the same float result.
    """
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    sign = total.sign_()
    # Of the zero sums, only those with a nonzero δ̃_t (exact cancellations, rare) depend on
    # the fill; most are elements every expert dropped. Σ_t |δ̃_t| tells them apart in a few
    # vectorized passes, so the index work is only for the rare ones. Where every δ̃_t is 0
    # the fill still gives the zero's sign, which shows only on a base of −0.0 (−0 + ±0).
    spread = deltas[0].abs()
    for d in deltas[1:]:
        spread.add_(d.abs())
    negative_zero = torch.signbit(base).logical_and_(base == 0)
    decides = spread.ne_(0).logical_or_(negative_zero).logical_and_(sign == 0)
    where = (decides.nonzero().flatten() if bool(decides.any())
             else torch.empty(0, dtype=torch.long))
    # float(sign.sum()) is exact: at most 2^18 values of ±1 per slice
    record_paper_vote_fixes(ctx, float(sign.sum()), where, [d[where] for d in deltas],
                            base[where], params)
    return ties_core(deltas, params, vote="paper", majority=1.0, scratch=scratch).add_(base)


def paper_vote(params: dict[str, Any]) -> bool:
    """Whether the paper vote's whole-tensor fix-ups apply (its ``Finish.when``): the weighted
    vote decides every element within its slice."""
    return params["vote"] == "paper"


def paper_vote_rows(base: torch.Tensor, deltas: list[torch.Tensor], params: dict[str, Any],
                    ctx: MergeContext) -> torch.Tensor:
    """:func:`paper_vote_slice` on a band of whole rows (a row-wise method's slice): the same
    elements, flattened, so the undecided ones are listed by their offset in the tensor."""
    flat = [d.reshape(-1) for d in deltas]
    return paper_vote_slice(base.reshape(-1), flat, params, ctx,
                            Scratch(flat[0])).view(base.shape)


def record_paper_vote_fixes(ctx: MergeContext, signs: float, where: torch.Tensor,
                            deltas_at: list[torch.Tensor], base_at: torch.Tensor,
                            params: dict[str, Any]) -> None:
    """Add a slice's Σ sign(Σ_t δ̃_t) and its undecided elements (slice-local ``where``, their
    δ̃_t and θ_0) to the paper-vote state; both the torch path and the fused kernel
    (``kernels.slices``) report here."""
    state = ctx.state(PaperVote, PaperVote)
    state.signs += signs
    if where.numel():
        low, zero = [ties_core([d.clone() for d in deltas_at], params, vote="paper",
                               majority=m).add_(base_at) for m in (-1.0, 0.0)]
        state.fixes.append((where + cast(int, ctx.slice_start), low, zero))


def finish_paper_vote(ctx: MergeContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The values of the undecided elements under the whole tensor's majority sign."""
    state = ctx.state_if_any(PaperVote)
    if state is None or state.signs > 0 or not state.fixes:
        return []
    pick = 1 if state.signs < 0 else 2
    return [(torch.cat([fix[0] for fix in state.fixes]),
             torch.cat([fix[pick] for fix in state.fixes]))]


# The finish step of every sliced paper-vote merge (ties, dare_ties, della, breadcrumbs_ties).
PAPER_VOTE = Finish(finish_paper_vote, when=paper_vote)


@register_method(
    name="ties",
    paper_settings={"density": 0.2},
    params=[weight_param(), density_param(1.0, "fraction of each task vector kept by magnitude"),
            lambda_param(), normalize_param(True), SCOPE, vote_param("paper"), rescale_l1_param(),
            INT8_MASK],
    paper="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)",
    summary="Trim task vectors by magnitude, elect a sign per entry, average the agreeing ones",
    base="required",
    execution=Execution(
        shape=_shape,
        passes=(_count_slice, _collect_slice),
        kernel=FusedKernel("ties"),
        finish=PAPER_VOTE,
        prepare=Prepare(ties_prepare, when=lambda params: params.get("scope") == "global"),
    ),
)
def ties(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
         ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    deltas = task_vectors(base, experts)
    scratch = Scratch(deltas[0])
    if ctx.slice_start is not None:  # per-tensor trim over slices (the engine's third pass)
        trim = ctx.state(SlicedTopK)
        for t, d in enumerate(deltas):
            trim.trim_(t, d)
        if params["vote"] == "paper":
            return paper_vote_slice(base, deltas, params, ctx, scratch)
        return ties_core(deltas, params, vote="weighted", scratch=scratch).add_(base)
    majority = None
    if params["scope"] == "global":
        stats = ctx.global_stats
        if not isinstance(stats, dict) or "thresholds" not in stats:
            raise MethodError(f"tensor '{ctx.name}': ties with scope: global needs the "
                              "whole-model pass (prepare) and the runner did not provide it")
        for d, v in zip(deltas, stats["thresholds"], strict=True):
            l1_rescaled_(d, lambda x, v=v: threshold_trim_(x, v, scratch), params["rescale"])  # type: ignore[misc]
        majority = stats["majority"]
    else:
        for d, density in zip(deltas, params["density"], strict=True):
            l1_rescaled_(d, lambda x, density=density: magnitude_trim_(x, density, scratch),  # type: ignore[misc]
                         params["rescale"])
    return ties_core(deltas, params, vote=params["vote"], majority=majority,
                     scratch=scratch).add_(base)
