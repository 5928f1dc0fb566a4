"""Fused slice kernels of Model Breadcrumbs' tensor-wide band (``granularity: tensor``, mergekit's
``magnitude_outliers``): the second counting pass and the merge, after which ``breadcrumbs`` or
``breadcrumbs_ties`` follows as its torch path does.

Per model t the band keeps v_lo < |δ_t| < v_top (δ_t = θ_t − θ_0), and the entries equal to a
cut-off value whose running index among those ties lies in its window [first, end) — the whole
tensor's ``orderstats.SlicedBand.trim_``, slice after slice: δ·1 or δ·0 (a dropped negative is
−0.0, as torch's multiply by the mask gives). The first pass is TIES' counting kernel
(``elementwise.ties_count_kernel``: the same histogram of |δ|'s upper 16 bits); the second
(:func:`band_collect_kernel`) counts the low 16 bits of the |δ| that fall in each cut-off's bin,
the counts ``orderstats.RankSelect`` orders exactly. |δ| are compared by their float32 bit
patterns (monotone for non-negative floats, and |δ| is never NaN once the inputs are finite).
"""

from __future__ import annotations

import numpy as np

from modelalloy.kernels._numba import JIT, any_nonfinite, f32_to_bits, njit, widen
from modelalloy.kernels.elementwise import CHUNK, _elect_and_merge, _merge_scratch, sum_to_output
from modelalloy.kernels.rowwise import _accumulate
from modelalloy.methods.orderstats import LOW_BINS, MAG_SHIFT

# Band modes per model (``SlicedBand.plan``): δ kept whole, zeroed (δ·0), or banded
BAND_NONE, BAND_EMPTY, BAND_CUT = 0, 1, 2
# A bit pattern no |δ| has (the largest is +inf's, 0x7F800000): "no top cut" as the strict
# upper bound, "no separate ties" as a tie value
NEVER = 0xFFFFFFFF
LOW_MASK = LOW_BINS - 1


@njit(**JIT)
def band_collect_kernel(src, count, bins, low_counts):
    """The band's second pass on one slice: for each model t and each of its (up to two)
    cut-off bins ``bins[t, i]`` (−1: none), ``low_counts[t, i]`` += the counts of the low
    ``MAG_SHIFT`` bits of the |θ_t − θ_0| whose upper bits are that bin. Bit patterns go to a
    chunk buffer first (a vectorized loop), then a scan counts the few in the bins."""
    patterns = np.empty(CHUNK, np.uint32)
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        base = src[0, c0:c0 + n]
        for t in range(src.shape[0] - 1):
            if bins[t, 0] < 0:
                continue
            row = src[1 + t, c0:c0 + n]
            b0, b1 = np.uint32(bins[t, 0]), np.uint32(bins[t, 1] if bins[t, 1] >= 0 else NEVER)
            low0, low1 = low_counts[t, 0], low_counts[t, 1]
            for j in range(n):
                patterns[j] = f32_to_bits(abs(widen(row[j]) - widen(base[j])))
            for j in range(n):
                key = patterns[j] >> MAG_SHIFT
                if key == b0:
                    low0[patterns[j] & LOW_MASK] += 1
                elif key == b1:
                    low1[patterns[j] & LOW_MASK] += 1
    return True


@njit(inline="always")
def _window_share(seen, ties, first, end):
    """Which of a chunk's ``ties`` at a cut-off value (running indices seen .. seen+ties−1)
    lie in its window [first, end): 0 none, 1 all, 2 some."""
    if ties == 0 or seen + ties <= first or seen >= end:
        return 0
    if seen >= first and seen + ties <= end:
        return 1
    return 2


@njit(inline="always")
def _band_chunk(d, n, lo, top, top_tie, win):
    """d[:n] banded in place: |d| (bit patterns) in (lo, top), or equal to ``lo`` (or to
    ``top_tie``, the top cut-off when it differs from ``lo``) with its running tie index in
    ``win[0]`` (``win[1]``) = [first, end, ties seen], whose seen counts move on. A chunk whose
    ties all fall in or out of their windows (the usual case) takes one vectorized pass."""
    nlo, ntop = 0, 0
    for j in range(n):
        m = f32_to_bits(abs(d[j]))
        nlo += np.int64(m == lo)
        ntop += np.int64(m == top_tie)
    share_lo = _window_share(win[0, 2], nlo, win[0, 0], win[0, 1])
    share_top = _window_share(win[1, 2], ntop, win[1, 0], win[1, 1])
    if share_lo != 2 and share_top != 2:
        with_lo = lo if share_lo == 1 else np.uint32(NEVER)
        with_top = top_tie if share_top == 1 else np.uint32(NEVER)
        for j in range(n):
            m = f32_to_bits(abs(d[j]))
            keep = ((m > lo) & (m < top)) | (m == with_lo) | (m == with_top)
            d[j] = d[j] * np.float32(keep)
    else:
        seen_lo, seen_top = win[0, 2], win[1, 2]
        for j in range(n):
            m = f32_to_bits(abs(d[j]))
            keep = (m > lo) & (m < top)
            if m == lo:
                keep = (seen_lo >= win[0, 0]) & (seen_lo < win[0, 1])
                seen_lo += 1
            elif m == top_tie:
                keep = (seen_top >= win[1, 0]) & (seen_top < win[1, 1])
                seen_top += 1
            d[j] = d[j] * np.float32(keep)
    win[0, 2] += nlo
    win[1, 2] += ntop


@njit(inline="always")
def _band_deltas(src, c0, n, modes, cuts, windows, d):
    """d[t, :n] = the banded δ_t of the chunk at column ``c0``; ``cuts[t]`` = (v_lo, v_top or
    NEVER, the top cut-off's own tie value or NEVER) as bit patterns."""
    base = src[0, c0:c0 + n]
    for t in range(d.shape[0]):
        row = src[1 + t, c0:c0 + n]
        for j in range(n):
            d[t, j] = widen(row[j]) - widen(base[j])
        if modes[t] == BAND_EMPTY:
            for j in range(n):
                d[t, j] = d[t, j] * np.float32(0.0)
        elif modes[t] == BAND_CUT:
            _band_chunk(d[t], n, cuts[t, 0], cuts[t, 1], cuts[t, 2], windows[t])


@njit(**JIT)
def band_ties_tensor_kernel(src, count, out, modes, cuts, windows, unit, weights, normalize,
                            min_weight, lam, weighted_vote, fix_index, fix_deltas, tally):
    """breadcrumbs_ties on one slice, after the two counting passes: the banded δ_t
    (:func:`_band_deltas`), then TIES' election and disjoint merge (``ties_core``, either
    vote, as ``elementwise.dare_ties_kernel``)."""
    if any_nonfinite(src, count):
        return False
    d, gamma, acc, den, spread = _merge_scratch(src.shape[0] - 1)
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        _band_deltas(src, c0, n, modes, cuts, windows, d)
        _elect_and_merge(d, n, c0, src[0], out, unit, weights, normalize, min_weight, lam,
                         weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den, spread)
    return True


@njit(**JIT)
def band_sum_tensor_kernel(src, count, out, modes, cuts, windows, unit, weights, post_div,
                           lam):
    """breadcrumbs on one slice, after the two counting passes: the banded δ_t, then
    ``_sparsify._sum_`` (δ_0·w_0, + δ_t or fma(δ_t, w_t, ·)), / Σw (``post_div``, 0 = none),
    ·λ, + θ_0."""
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d = np.empty((nexp, CHUNK), np.float32)
    acc = np.empty(CHUNK, np.float32)
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        _band_deltas(src, c0, n, modes, cuts, windows, d)
        for t in range(nexp):
            _accumulate(acc, d[t], t, n, unit, weights)
        sum_to_output(acc, n, src[0, c0:c0 + n], out[c0:c0 + n], post_div, lam)
    return True
