"""The engine's side of the fused kernels: make a kernel for a tensor's parameters, call it.

A factory takes a sliced tensor's resolved parameters and returns a :data:`SliceKernel`; which
parameters a kernel serves is the method's to declare (``FusedKernel(when=...)`` in its
``Execution``, beside its sliced shape), not repeated here. ``kernel(src, count, out, ctx,
width)`` merges the first ``count`` columns of ``src`` (stored bits, one row per source, base
first) into ``out`` and returns False when an input was NaN/Inf; ``width`` is the tensor's
row length (per-row methods get whole rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modelalloy.methods.registry import KeptBits, MergeContext

SliceKernel = Callable[[np.ndarray, int, np.ndarray, MergeContext, int], bool]


def widen(bits: np.ndarray) -> torch.Tensor:
    """Stored values (uint16 bfloat16 bits, or float32) as a float32 tensor."""
    if bits.dtype == np.uint16:
        return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(bits.astype(np.float32))


def _sum_divisor(params: dict[str, Any]) -> np.float32:
    """``_sparsify._sum_``'s normalisation: Σw when ``normalize`` and |Σw| ≥ 1e-8, else 0
    (the kernels' "no division")."""
    total = float(sum(params["weight"]))
    return np.float32(total) if params["normalize"] and abs(total) >= 1e-8 else np.float32(0)


def _f32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _weight_kinds(weights: list[float]) -> np.ndarray:
    from modelalloy.kernels.elementwise import SCALED, SKIP, UNIT

    return np.asarray([SKIP if w == 0 else UNIT if w == 1 else SCALED for w in weights],
                      dtype=np.int8)


def linear(params: dict[str, Any]) -> SliceKernel:
    from modelalloy.kernels.elementwise import weighted_kernel

    weights = list(params["weight"])
    kinds, w = _weight_kinds(weights), _f32(weights)
    # linear() has already refused a zero or negative sum for normalize: true
    div = np.float32(sum(weights)) if params["normalize"] else np.float32(0)

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            width: int = 1) -> bool:
        return weighted_kernel(src, count, out, False, kinds, w, div, np.float32(1))
    return run


def task_arithmetic(params: dict[str, Any]) -> SliceKernel:
    from modelalloy.kernels.elementwise import weighted_kernel

    weights = list(params["weight"])
    scale = float(params["lambda"])
    if params["normalize"]:
        total = float(sum(weights))
        if abs(total) >= 1e-8:
            scale /= total
    kinds, w = _weight_kinds(weights), _f32(weights)

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            width: int = 1) -> bool:
        return weighted_kernel(src, count, out, True, kinds, w, np.float32(0),
                               np.float32(scale))
    return run


class _ModelStockKernel:
    """Model Stock (one angle per tensor) on the fused path. Its pass (``passes``) writes the
    float32 deltas, widened, into the buffer the torch path's ``add_gram_`` uses and hands it
    to the same matrix product, so the Gram — and t — come out the same either way. The
    merge repeats ``model_stock``'s float32 steps: ((δ_0 + δ_1) + …) / N · t + θ_0."""

    def __init__(self) -> None:
        self.passes = (self.gram,)

    def gram(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        from modelalloy.kernels.elementwise import difference_rows_kernel
        from modelalloy.methods.gram import SlicedGram, add_products_, difference_rows, new_gram

        models = src.shape[0] - 1
        rows = difference_rows(count, models, torch.device("cpu"))
        if not difference_rows_kernel(src, count, rows.numpy()):
            return False
        add_products_(ctx.state(SlicedGram, lambda: SlicedGram(new_gram(models))).gram, rows)
        return True

    def __call__(self, src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
                 width: int = 1) -> bool:
        from modelalloy.kernels.elementwise import UNIT, weighted_kernel
        from modelalloy.methods.gram import SlicedGram
        from modelalloy.methods.model_stock import ratio_from_gram

        n = src.shape[0] - 1
        t = np.float32(ratio_from_gram(ctx.state(SlicedGram).gram, ctx))
        return weighted_kernel(src, count, out, True, np.full(n, UNIT, np.int8),
                               np.ones(n, np.float32), np.float32(n), t)


def model_stock(params: dict[str, Any]) -> SliceKernel:
    """One angle per tensor (the sliced case: ``filter_wise`` merges whole tensors)."""
    return _ModelStockKernel()


@dataclass
class _SFC64States:
    """DARE's SFC64 states (uint64[4] per model) of a sliced tensor, advanced in place by the
    kernel from slice to slice."""

    states: np.ndarray


class _L1SFC64States(_SFC64States):
    """The L1 pass's own replay of the same streams (the merge pass then draws them again,
    unless the pass kept the masks: :class:`_KeptMasks`)."""


@dataclass
class _KeptMasks:
    """The keep masks the L1 pass drew, as bits (per model that drops at random, a row of
    ``numel / 8`` bytes rounded up to 8), for the merge pass to read instead of drawing them
    again: made when the engine grants them (``registry.KeptBits``, counted in the tensor's
    working bytes)."""

    bits: np.ndarray


NO_KEPT = np.zeros((0, 0), np.uint8)  # the kernels' "draw the masks"


@dataclass
class _FixBuffers:
    """The TIES kernels' buffers of a slice's undecided elements (paper vote), as wide as the
    slice, reused for the whole tensor."""

    index: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    deltas: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))


@dataclass
class _TiesCounts:
    """The TIES kernel's |τ| histogram per model, counted into across the slices."""

    hist: np.ndarray


@dataclass
class _TiesValues:
    """The TIES kernel's buffer of a slice's |τ| values in the threshold's bin, per model."""

    values: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))


class _DareDrops:
    """Per-model drop modes, SFC64 states (continuing across slices) and thresholds."""

    def __init__(self, params: dict[str, Any]) -> None:
        from modelalloy.kernels.elementwise import DROP_ALL, DROP_RANDOM, KEEP_ALL

        densities = list(params["density"])
        self.modes = np.asarray([KEEP_ALL if p >= 1.0 else DROP_ALL if p <= 0.0 else DROP_RANDOM
                                 for p in densities], dtype=np.int8)
        self.thresholds = np.asarray([min(round(p * 2**32), 2**32 - 1) if 0 < p < 1 else 0
                                      for p in densities], dtype=np.uint32)
        self.inv_density = _f32([1.0 / p if 0 < p < 1 else 1.0 for p in densities])
        self.rescale = bool(params["rescale"])
        self.random = int(np.count_nonzero(self.modes == DROP_RANDOM))

    def states(self, ctx: MergeContext,
               kind: type[_SFC64States] | None = None) -> np.ndarray:
        """One uint64[4] SFC64 state per model, the same stream ``ctx.keep_mask`` draws; one
        set per ``kind`` (the L1 pass replays, in its own set, the streams the merge then
        draws)."""
        kind = kind or _SFC64States

        def start() -> _SFC64States:
            return kind(np.stack([ctx.sfc64_state(i) for i in range(len(self.modes))]))
        if ctx.streams is None:
            return start().states
        return ctx.state(kind, start).states


class _DareKernel:
    """A DARE merge kernel ``merge(src, count, out, ctx, rescale, scales)`` with its passes:
    none, or with the L1 rescale (``dare.rescales_to_l1``) the pass that gathers the whole
    tensor's L1 sums (``elementwise.dare_l1_kernel``: the exact bins of ``dare.L1Sums``, as
    ``dare.gather_l1_sums`` adds them on the torch path); the survivors' scale is then
    ‖δ‖₁/‖δ ⊙ m‖₁ in float32 instead of 1/density, and the kernel's (δ·m)·scale is the torch
    path's two multiplies."""

    def __init__(self, params: dict[str, Any], drops: _DareDrops,
                 merge: Callable[..., bool]) -> None:
        from modelalloy.methods.dare import rescales_to_l1

        self.params, self.drops, self.merge = params, drops, merge
        self.l1 = rescales_to_l1(params)
        self.passes = (self.gather,) if self.l1 else ()

    def gather(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        from modelalloy.kernels.elementwise import dare_l1_kernel
        from modelalloy.methods.dare import L1Sums

        drops = self.drops
        sums = ctx.state(L1Sums, lambda: L1Sums.new(len(drops.modes), None))
        grant = ctx.state_if_any(KeptBits)
        kept = NO_KEPT if grant is None else ctx.state(_KeptMasks, lambda: _KeptMasks(
            np.empty((drops.random, -(-grant.numel // 64) * 8), np.uint8))).bits
        return dare_l1_kernel(src, count, drops.modes, drops.states(ctx, _L1SFC64States),
                              drops.thresholds, sums.before, sums.after, kept,
                              self._kept_at(ctx))

    def __call__(self, src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
                 width: int = 1) -> bool:
        from modelalloy.methods.dare import L1Sums

        scales = self.drops.inv_density
        if self.l1:
            scales = _f32(ctx.state(L1Sums).factors())
        masks = ctx.state_if_any(_KeptMasks)
        kept = NO_KEPT
        if masks is not None:  # the slice's masks as 0/1 bytes (NumPy's SIMD unpacking)
            at = self._kept_at(ctx)
            kept = np.unpackbits(masks.bits[:, at:at + -(-count // 8)], axis=1, count=count,
                                 bitorder="little")
        return self.merge(src, count, out, ctx, self.drops.rescale, scales, kept)

    @staticmethod
    def _kept_at(ctx: MergeContext) -> int:
        """The slice's first byte in the kept bits (slices start on multiples of 8)."""
        start = ctx.slice_start or 0
        assert start % 8 == 0
        return start // 8


def dare_linear(params: dict[str, Any]) -> SliceKernel:
    from modelalloy.kernels.elementwise import dare_linear_kernel

    drops = _DareDrops(params)
    weights = list(params["weight"])
    div = _sum_divisor(params)
    unit = np.asarray([w == 1.0 for w in weights])
    w, lam = _f32(weights), np.float32(params["lambda"])

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            rescale: bool, scales: np.ndarray, kept: np.ndarray) -> bool:
        return dare_linear_kernel(src, count, out, drops.modes, drops.states(ctx),
                                  drops.thresholds, rescale, scales, kept, unit, w, div, lam)
    return _DareKernel(params, drops, run)


class _TiesMerge:
    """What dare_ties and ties hand the kernels' election and disjoint merge
    (``_elect_and_merge``), and the paper vote's fix-ups they report back."""

    def __init__(self, params: dict[str, Any]) -> None:
        weights = list(params["weight"])
        positive = [w for w in weights if w > 0]
        self.params = params
        self.nexp = len(weights)
        self.unit = np.asarray([w == 1.0 for w in weights])
        self.weights, self.lam = _f32(weights), np.float32(params["lambda"])
        self.min_weight = np.float32(min(positive) if positive else 1.0)
        self.normalize = bool(params["normalize"])
        self.weighted_vote = params["vote"] == "weighted"

    def args(self, ctx: MergeContext, width: int) -> tuple:
        """The kernels' merge arguments, from ``unit`` to ``tally``; the fix-up buffers (as
        wide as the slice buffer) live in ``ctx.streams`` for the whole tensor."""
        fixes = ctx.state(_FixBuffers, _FixBuffers)  # the engine's per-tensor state
        if fixes.index.size < width:
            fixes.index = np.empty(width, np.int64)
            fixes.deltas = np.empty((self.nexp, width), np.float32)
        return (self.unit, self.weights, self.normalize, self.min_weight, self.lam,
                self.weighted_vote, fixes.index, fixes.deltas, np.zeros(2, np.int64))

    def run(self, ctx: MergeContext, src: np.ndarray, kernel: Callable[[tuple], bool]) -> bool:
        """``kernel(merge arguments)`` on a slice, then its fix-ups reported; False (nothing
        reported) when an input was NaN/Inf."""
        args = self.args(ctx, src.shape[1])
        if not kernel(args):
            return False
        self.report(ctx, src, args[-1])
        return True

    def report(self, ctx: MergeContext, src: np.ndarray, tally: np.ndarray) -> None:
        """Hand a merged slice's Σ sign and undecided elements to the paper-vote state
        (``ties.record_paper_vote_fixes``, as the torch path does)."""
        from modelalloy.methods.ties import record_paper_vote_fixes

        if self.weighted_vote:
            return
        nfix, fixes = int(tally[1]), ctx.state(_FixBuffers)
        where = fixes.index[:nfix].copy()
        record_paper_vote_fixes(
            ctx, float(tally[0]), torch.from_numpy(where),
            [torch.from_numpy(fixes.deltas[t, :nfix].copy())
             for t in range(self.nexp)], widen(src[0, where]), self.params)


def dare_ties(params: dict[str, Any]) -> SliceKernel:
    """dare_ties' sliced path (``methods.dare``): the paper vote's zero-sum elements go to the
    same ``paper_vote`` state that ``ties.finish_paper_vote`` settles after the last slice."""
    from modelalloy.kernels.elementwise import dare_ties_kernel

    drops, merge = _DareDrops(params), _TiesMerge(params)

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            rescale: bool, scales: np.ndarray, kept: np.ndarray) -> bool:
        return merge.run(ctx, src, lambda args: dare_ties_kernel(
            src, count, out, drops.modes, drops.states(ctx), drops.thresholds, rescale,
            scales, kept, *args))
    return _DareKernel(params, drops, run)


class _Bands:
    """Breadcrumbs' per-model band edges for a row width, as ``band_trim_`` computes them:
    n_top = int(n·γ), hi = min(n, n_top + int(n·density))."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.gammas, self.densities = list(params["gamma"]), list(params["density"])
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        if width not in self.cache:
            tops = [int(gamma * width) for gamma in self.gammas]
            his = [min(width, top + int(density * width))
                   for top, density in zip(tops, self.densities, strict=True)]
            self.cache[width] = (np.asarray(tops, np.int64), np.asarray(his, np.int64))
        return self.cache[width]


@dataclass
class _BandLowCounts:
    """The band kernel's second pass: per model its cut-off bins (two, −1: none) and the
    low-bit counts of each, counted into across slices (``SlicedBand`` holds views)."""

    bins: np.ndarray
    counts: np.ndarray


@dataclass
class _BandPlan:
    """The band kernel's per-model modes, cut-offs (bit patterns) and tie windows, made from
    ``SlicedBand.plan`` at the first merged slice; the windows' seen counts run on."""

    modes: np.ndarray
    cuts: np.ndarray
    windows: np.ndarray


def _bits_of(value: float) -> int:
    return int(np.asarray(value, np.float32).view(np.uint32))


class _TensorBandKernel:
    """Breadcrumbs' tensor-wide band (no L1 rescale) on the fused path: two counting passes
    (``passes``) into ``methods.orderstats.SlicedBand``, the torch path's state, then the
    merge ``merge(src, count, out, ctx, modes, cuts, windows)``."""

    def __init__(self, params: dict[str, Any], merge: Callable[..., bool]) -> None:
        self.params, self.merge = params, merge
        self.trims = np.asarray([d < 1.0 for d in params["density"]])
        self.passes = (self.count, self.collect)

    def _band(self, ctx: MergeContext):
        from modelalloy.methods.orderstats import SlicedBand

        return ctx.state(SlicedBand, lambda: SlicedBand(self.params["density"],
                                                        self.params["gamma"]))

    def count(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        return _count_magnitudes(src, count, ctx, self.trims, self._band(ctx))

    def _low_counts(self, ctx: MergeContext) -> _BandLowCounts:
        from modelalloy.methods.orderstats import LOW_BINS

        def start() -> _BandLowCounts:
            band, models = self._band(ctx), len(self.trims)
            held = _BandLowCounts(np.full((models, 2), -1, np.int64),
                                  np.zeros((models, 2, LOW_BINS), np.int64))
            for t in range(models):
                for i, b in enumerate(band.bins_of(t)):
                    held.bins[t, i] = b
                    band.add_low_counts(t, b, torch.from_numpy(held.counts[t, i]))
            return held
        return ctx.state(_BandLowCounts, start)

    def collect(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        from modelalloy.kernels.bands import band_collect_kernel

        held = self._low_counts(ctx)
        return band_collect_kernel(src, count, held.bins, held.counts)

    def _plan(self, ctx: MergeContext) -> _BandPlan:
        from modelalloy.kernels.bands import BAND_CUT, BAND_EMPTY, BAND_NONE, NEVER

        def start() -> _BandPlan:
            band, models = self._band(ctx), len(self.trims)
            plan = _BandPlan(np.full(models, BAND_NONE, np.int8),
                             np.full((models, 3), NEVER, np.uint32),
                             np.zeros((models, 2, 3), np.int64))
            for t in range(models):
                edges, cut = band.plan(t)
                if edges is None:
                    continue
                if cut is None:
                    plan.modes[t] = BAND_EMPTY
                    continue
                low, top, windows = cut
                plan.modes[t] = BAND_CUT
                plan.cuts[t, 0] = _bits_of(low)
                plan.windows[t, 0] = windows[low]
                if top is not None:
                    plan.cuts[t, 1] = _bits_of(top)
                    if top != low:  # equal cut-offs share one window
                        plan.cuts[t, 2] = _bits_of(top)
                        plan.windows[t, 1] = windows[top]
            return plan
        return ctx.state(_BandPlan, start)

    def __call__(self, src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
                 width: int = 1) -> bool:
        plan = self._plan(ctx)
        return self.merge(src, count, out, ctx, plan.modes, plan.cuts, plan.windows)


def _tensor_wide(params: dict[str, Any]) -> bool:
    return params["granularity"] == "tensor"


def breadcrumbs(params: dict[str, Any]) -> SliceKernel:
    """Per-row bands or a tensor-wide band, without the L1 rescale (the sliced cases)."""
    from modelalloy.kernels.bands import band_sum_tensor_kernel
    from modelalloy.kernels.rowwise import band_sum_kernel

    weights = list(params["weight"])
    div = _sum_divisor(params)
    unit = np.asarray([w == 1.0 for w in weights])
    w, lam = _f32(weights), np.float32(params["lambda"])
    if _tensor_wide(params):
        def merge(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
                  *band: np.ndarray) -> bool:
            return band_sum_tensor_kernel(src, count, out, *band, unit, w, div, lam)
        return _TensorBandKernel(params, merge)
    bands = _Bands(params)

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            width: int = 1) -> bool:
        return band_sum_kernel(src, count, out, width, *bands(width), unit, w, div, lam)
    return run


def breadcrumbs_ties(params: dict[str, Any]) -> SliceKernel:
    """Per-row bands or a tensor-wide band, then TIES' election and disjoint merge (either
    vote); the paper vote's zero-sum elements go to the ``paper_vote`` state that
    ``ties.finish_paper_vote`` settles after the last slice."""
    from modelalloy.kernels.bands import band_ties_tensor_kernel
    from modelalloy.kernels.rowwise import band_ties_kernel

    merge = _TiesMerge(params)
    if _tensor_wide(params):
        def merge_band(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
                       *band: np.ndarray) -> bool:
            return merge.run(ctx, src, lambda args: band_ties_tensor_kernel(
                src, count, out, *band, *args))
        return _TensorBandKernel(params, merge_band)
    bands = _Bands(params)

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            width: int = 1) -> bool:
        return merge.run(ctx, src, lambda args: band_ties_kernel(
            src, count, out, width, *bands(width), *args))
    return run


class _MagPrune:
    """DELLA's per-model MagPrune constants and the slice's uniform draws, as
    ``_sparsify.magprune_`` makes them (``ctx.rand_like`` per pruned model, continuing from
    slice to slice; unpruned models draw nothing)."""

    def __init__(self, params: dict[str, Any]) -> None:
        from modelalloy.methods.della import check_epsilon

        # the torch path checks this per tensor (della_deltas); a bad window must not merge
        check_epsilon(params["density"], params["epsilon"], "della")
        self.density = [float(d) for d in params["density"]]
        self.epsilon = [float(e) for e in params["epsilon"]]
        self.trims = np.asarray([d < 1.0 for d in self.density])
        self.rescale = bool(params["rescale"])

    def args(self, ctx: MergeContext, count: int, width: int) -> tuple:
        """(trims, uniforms, low, step, density, rescale) for ``della_kernel``."""
        uniforms = np.zeros((len(self.trims), count), np.float32)
        for t in np.nonzero(self.trims)[0]:
            uniforms[t] = ctx.rand_like(torch.empty(count), int(t)).numpy()
        # π = r·(2ε/(n−1)) + (density − ε), each constant rounded to float32 as torch's
        # ``mul_``/``add_`` of a Python scalar do
        step = [2.0 * e / (width - 1) if width > 1 else 0.0 for e in self.epsilon]
        low = [d - e for d, e in zip(self.density, self.epsilon, strict=True)]
        return (self.trims, uniforms, _f32(low), _f32(step), _f32(self.density), self.rescale)


def della(params: dict[str, Any]) -> SliceKernel:
    """DELLA without the L1 rescale (its sliced case); the paper vote's zero-sum elements go
    to the ``paper_vote`` state that ``ties.finish_paper_vote`` settles after the last slice."""
    from modelalloy.kernels.rowwise import della_kernel

    prune, merge = _MagPrune(params), _TiesMerge(params)

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            width: int = 1) -> bool:
        return merge.run(ctx, src, lambda args: della_kernel(
            src, count, out, width, *prune.args(ctx, count, width), *args))
    return run


def della_linear(params: dict[str, Any]) -> SliceKernel:
    """della_linear without the L1 rescale (its sliced case)."""
    from modelalloy.kernels.rowwise import della_sum_kernel

    prune, weights = _MagPrune(params), list(params["weight"])
    unit, w = np.asarray([x == 1.0 for x in weights]), _f32(weights)
    div, lam = _sum_divisor(params), np.float32(params["lambda"])

    def run(src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
            width: int = 1) -> bool:
        return della_sum_kernel(src, count, out, width, *prune.args(ctx, count, width),
                                unit, w, div, lam)
    return run


def _count_magnitudes(src: np.ndarray, count: int, ctx: MergeContext, trims: np.ndarray,
                      select: Any) -> bool:
    """The first counting pass of a tensor-wide cut-off (TIES' top k, Breadcrumbs' band) on
    one slice: ``select`` (``orderstats.SlicedTopK`` or ``SlicedBand``) gets one |δ|
    histogram per model that ``trims`` for the whole tensor, counted into across slices (it
    holds views of it from the first slice on), and the element count."""
    from modelalloy.kernels.elementwise import NBINS, ties_count_kernel

    counts = ctx.state_if_any(_TiesCounts)
    if counts is None:
        counts = ctx.state(_TiesCounts, lambda: _TiesCounts(
            np.zeros((len(trims), NBINS), np.int64)))
        for t in range(len(trims)):
            if trims[t]:
                select.add_counts(t, torch.from_numpy(counts.hist[t]), 0)
    if not ties_count_kernel(src, count, trims, counts.hist):
        return False
    select.add_counts(0, None, count)  # the element count
    return True


class _TiesKernel:
    """TIES (per tensor, no rescale) on the fused path: a sample and a bracketed counting pass
    (``passes``, ``kernels.topk.SampledTopK``), and only when the bracket misses, the two exact
    counting passes (``more_passes``) into ``methods.orderstats.SlicedTopK``, as on the torch
    path; then the merge. Either way the cut-offs, and so the bits, are the same."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.merge = _TiesMerge(params)
        self.trims = np.asarray([d < 1.0 for d in params["density"]])
        self.passes = (self.sample, self.bracket)

    def _sampled(self, ctx: MergeContext):
        from modelalloy.kernels.topk import SampledTopK

        return ctx.state(SampledTopK, lambda: SampledTopK(self.params["density"]))

    def _trim(self, ctx: MergeContext):
        from modelalloy.methods.orderstats import SlicedTopK

        return ctx.state(SlicedTopK, lambda: SlicedTopK(self.params["density"]))

    def sample(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        self._sampled(ctx).add_sample(src, count, ctx.slice_start or 0)
        return True

    def bracket(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        return self._sampled(ctx).count(src, count)

    def more_passes(self, ctx: MergeContext) -> tuple:
        """The exact counting passes, when the bracket missed a cut-off (rare)."""
        return () if self._sampled(ctx).check() else (self.count, self.collect)

    def count(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        return _count_magnitudes(src, count, ctx, self.trims, self._trim(ctx))

    def collect(self, src: np.ndarray, count: int, ctx: MergeContext, width: int = 1) -> bool:
        from modelalloy.kernels.elementwise import ties_collect_kernel

        trim = self._trim(ctx)
        bins = np.asarray([trim.bin_of(t) for t in range(len(self.trims))], np.int64)
        buffer = ctx.state(_TiesValues, _TiesValues)
        if buffer.values.shape[1] < count:
            buffer.values = np.empty((len(self.trims), src.shape[1]), np.float32)
        values = buffer.values
        found = np.zeros(len(self.trims), np.int64)
        ties_collect_kernel(src, count, bins, values, found)
        for t in range(len(self.trims)):
            if bins[t] >= 0:
                trim.add_values(t, torch.from_numpy(values[t, :found[t]].copy()))
        return True

    def __call__(self, src: np.ndarray, count: int, out: np.ndarray, ctx: MergeContext,
                 width: int = 1) -> bool:
        from modelalloy.kernels.elementwise import TRIM_ALL, TRIM_NONE, TRIM_TOP_K, ties_kernel

        sampled = self._sampled(ctx)
        trim = sampled if sampled.check() else self._trim(ctx)
        plans = [trim.plan(t) for t in range(len(self.trims))]
        modes = np.asarray([TRIM_NONE if k is None or v == 0.0 else TRIM_ALL if k <= 0
                            else TRIM_TOP_K for k, v, _ in plans], np.int8)
        thresholds = _f32([v or 0.0 for _, v, _ in plans])
        ties_left = np.asarray([left for _, _, left in plans], np.int64)
        def merge(args: tuple) -> bool:
            # the bracket or count pass checked every input of every slice
            if not ties_kernel(src, count, out, modes, thresholds, ties_left, True, *args):
                return False
            trim.ties_left = [int(x) for x in ties_left]
            return True
        return self.merge.run(ctx, src, merge)


def ties(params: dict[str, Any]) -> SliceKernel:
    """Per-tensor TIES without the L1 rescale (the sliced case)."""
    return _TiesKernel(params)


def reduce_passes(kernel: Any, ctx: MergeContext) -> Iterator[Callable[..., bool]]:
    """A kernel's counting passes in order: its ``passes``, then what its ``more_passes(ctx)``
    asks for once they are done over every slice (TIES' exact passes after a missed bracket).
    Each pass runs over all the tensor's slices before the next is asked for."""
    yield from getattr(kernel, "passes", ())
    more = getattr(kernel, "more_passes", None)
    if more is not None:
        yield from more(ctx)


def warm(name: str, params: dict[str, Any], sources: int, src_dtype: torch.dtype,
         out_dtype: torch.dtype) -> None:
    """Run kernel factory ``name``'s kernel, passes first, once on two rows of two columns, so
    numba compiles (or loads from its cache) every function it calls: a budgeted merge does
    this before it measures what the process holds (engine.run.in_flight_budget)."""
    from modelalloy import kernels
    from modelalloy.methods.registry import MergeContext

    width, count = 2, 4
    ramp = torch.linspace(-1.0, 1.0, count)
    raw = torch.stack([ramp * (1.0 + 0.1 * i) for i in range(sources)]).to(src_dtype)
    out = torch.empty(count, dtype=out_dtype)
    ctx = MergeContext(name="warm", seed=0, streams={})
    ctx.slice_start = 0
    kernel = globals()[name](params)
    for reduce in reduce_passes(kernel, ctx):  # a sample this small takes every pass TIES has
        reduce(kernels.bits(raw), count, ctx, width)
    kernel(kernels.bits(raw), count, kernels.bits(out), ctx, width)
