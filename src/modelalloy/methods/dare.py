"""DARE: drop and rescale task vectors, then merge linearly or with TIES' sign election.

``dare_linear`` / ``dare_ties`` — Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario:
Absorbing Abilities from Homologous Models as a Free Lunch", ICML 2024 (arXiv 2311.03099);
official code yule-BUAA/MergeLM.

Per model and tensor, δ = θ_t − θ_0, m ~ Bernoulli(1 − p) keep mask with p = 1 − ``density``:

    δ̃ = δ ⊙ m / (1 − p)                       (rescale, the paper; ``rescale_norm: density``)
    δ̃ = (δ ⊙ m) · ‖δ‖₁ / ‖δ ⊙ m‖₁              (``rescale_norm: l1``, current mergekit)

``dare_linear``: θ = θ_0 + λ Σ_t w_t δ̃_t   (÷ Σ w_t with ``normalize``).
``dare_ties``:   TIES election on the δ̃_t (no magnitude trim, as in mergekit), disjoint sum
(``normalize: false``, mergekit's default) or mean (``normalize: true``, MergeLM's DARE+TIES),
times λ.

Defaults: ``density`` 1.0 (no drop, as mergekit; the papers use 0.1–0.9, Long-to-Short uses
0.6–0.7 for 7–14B), ``rescale`` true, ``rescale_norm`` l1 and ``vote`` weighted (mergekit's;
``conventions: paper`` makes them density — the faithful 1/(1−p) — and paper), ``lambda`` 1,
``normalize`` false.

Randomness: the mask comes from ``ctx.keep_mask(δ, density, model_index)``, an SFC64 stream
seeded by (recipe seed, tensor name, model index): the same recipe gives the same masks on any
device or thread count, but not the official code's global-RNG stream.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from modelalloy.methods._l1 import add_abs_bins_, bins_to_float, new_bins
from modelalloy.methods._sparsify import (
    INT8_MASK,
    Scratch,
    combine_,
    dare_,
    density_param,
    l1_factor,
    lambda_param,
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
    register_method,
)
from modelalloy.methods.ties import PAPER_VOTE, paper_vote_slice, ties_core, whole_if_negative

PAPER = ("Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)")

RESCALE = Param("rescale", bool, True, "rescale the kept entries after dropping")
RESCALE_NORM = Param("rescale_norm", str, "l1",
                     "how to rescale: density (divide by 1−p, the paper) or l1 (match the "
                     "original L1 norm, current mergekit)", choices=("density", "l1"),
                     paper_default="density")


def rescales_to_l1(params: dict[str, Any]) -> bool:
    """Whether the survivors are scaled to the tensor's L1 norm (a whole-tensor sum)."""
    return bool(params["rescale"]) and params["rescale_norm"] == "l1"


@dataclass
class L1Sums:
    """A sliced merge's whole-tensor L1 norms per model, ‖δ_t‖₁ and ‖δ_t ⊙ m_t‖₁, as exact
    bins (``_l1``: models × ``L1_BINS``) gathered in a first pass over the slices (torch:
    :func:`gather_l1_sums`; fused: ``kernels.slices``). ``draws`` replays the keep masks from
    their own streams, so the merge pass draws them again from the start."""

    before: np.ndarray
    after: np.ndarray
    draws: MergeContext | None
    _norms: list[tuple[float, float]] | None = None

    @classmethod
    def new(cls, models: int, draws: MergeContext | None) -> L1Sums:
        return cls(new_bins(models), new_bins(models), draws)

    def norms(self, model: int) -> tuple[float, float]:
        """(‖δ‖₁, ‖δ ⊙ m‖₁) of one model, each rounded once to float64; read after the
        pass (rounded on the first call, once per tensor)."""
        if self._norms is None:
            self._norms = [(bins_to_float(b), bins_to_float(a))
                           for b, a in zip(self.before, self.after, strict=True)]
        return self._norms[model]

    def factors(self) -> list[float]:
        """Per model, the survivors' scale ‖δ‖₁ / ‖δ ⊙ m‖₁ (1 where a norm is ~0)."""
        return [f if (f := l1_factor(*self.norms(i))) is not None else 1.0
                for i in range(len(self.before))]


def gather_l1_sums(base: torch.Tensor | None, experts: list[torch.Tensor],
                   params: dict[str, Any], ctx: MergeContext) -> None:
    """First pass of a sliced merge with the L1 rescale: this slice's |δ_t| and |δ_t ⊙ m_t|
    into the tensor's :class:`L1Sums` bins (exact, so the slices add up to the whole
    tensor's norms)."""
    assert base is not None
    n = len(experts)
    sums = ctx.state(L1Sums, lambda: L1Sums.new(n, replace(ctx, streams={})))
    assert sums.draws is not None
    for i, (e, density) in enumerate(zip(experts, params["density"], strict=True)):
        if not 0.0 < density < 1.0:
            continue
        d = torch.sub(e, base)
        add_abs_bins_(sums.before[i], d)
        add_abs_bins_(sums.after[i], d.mul_(sums.draws.keep_mask(d, density, i)))


def slice_passes(params: dict[str, Any]) -> tuple:
    """The passes before a sliced merge: the L1 sums when the survivors are rescaled to them."""
    return (gather_l1_sums,) if rescales_to_l1(params) else ()


def kept_mask_bits(params: dict[str, Any]) -> int:
    """Bits per element the fused L1 pass keeps for the merge when the engine grants them:
    the keep mask of each model that drops at random, so the merge reads them instead of
    drawing them again (``kernels.slices._KeptMasks``)."""
    if not rescales_to_l1(params):
        return 0
    return sum(1 for density in params["density"] if 0.0 < density < 1.0)


def dare_deltas(base: torch.Tensor, experts: list[torch.Tensor], params: dict[str, Any],
                ctx: MergeContext) -> list[torch.Tensor]:
    deltas = task_vectors(base, experts)
    sums = ctx.state_if_any(L1Sums) if ctx.slice_start is not None else None
    for i, (d, density) in enumerate(zip(deltas, params["density"], strict=True)):
        dare_(d, density, ctx, i, rescale=params["rescale"], rescale_norm=params["rescale_norm"],
              l1_sums=sums.norms(i) if sums is not None else None)
    return deltas


_COMMON = [weight_param(), density_param(1.0, "fraction of entries kept (1 − drop rate p)"),
           lambda_param(), RESCALE, RESCALE_NORM, INT8_MASK]


@register_method(
    name="dare_linear",
    paper_settings={"density": 0.1},
    params=[*_COMMON, normalize_param(False)],
    paper=PAPER,
    summary="Randomly drop task-vector entries, rescale, and add the weighted sum to the base",
    base="required",
    execution=Execution(shape="elementwise", passes=slice_passes,
                        kernel=FusedKernel("dare_linear"), kept_bits=kept_mask_bits),
)
def dare_linear(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
                ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    deltas = dare_deltas(base, experts, params, ctx)
    merged = combine_(deltas, params["weight"], sign=None, normalize=params["normalize"])
    return merged.mul_(float(params["lambda"])).add_(base)


@register_method(
    name="dare_ties",
    paper_settings={"density": 0.1},
    params=[*_COMMON, normalize_param(False), vote_param("paper")],
    paper=PAPER,
    summary="Randomly drop task-vector entries, rescale, then TIES sign election and merge",
    base="required",
    execution=Execution(shape=whole_if_negative(lambda params: "elementwise"),
                        passes=slice_passes, finish=PAPER_VOTE,
                        kernel=FusedKernel("dare_ties"), kept_bits=kept_mask_bits),
)
def dare_ties(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
              ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    scratch = Scratch(base)
    deltas = dare_deltas(base, experts, params, ctx)
    if ctx.slice_start is not None and params["vote"] == "paper":
        return paper_vote_slice(base, deltas, params, ctx, scratch)
    return ties_core(deltas, params, vote=params["vote"], scratch=scratch).add_(base)
