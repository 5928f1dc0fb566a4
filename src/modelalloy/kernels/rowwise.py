"""Fused slice kernel of Model Breadcrumbs' per-row band (``_sparsify.band_trim_``), then the
weighted sum (``_sparsify._sum_``), ×λ, + θ_0 — as ``methods.breadcrumbs.breadcrumbs`` does.

Per row and model, the kept band is magnitude ranks n_top+1 .. hi (|δ| descending, equal
magnitudes by index, lower first). The two rank values come from a histogram of the upper bits
of |δ|'s float32 bit pattern (monotone for non-negative floats): one counting pass finds the
bin of each rank, and only the entries of that bin are ordered. One more pass applies the band
with running tie counters. No sort: about O(n) per row.
"""

from __future__ import annotations

import numpy as np

from modelalloy.kernels._numba import JIT, any_nonfinite, f32_to_bits, fma, njit, widen
from modelalloy.kernels.elementwise import _elect_and_merge, sum_to_output

SHIFT = 20  # bins of |δ| bit patterns: 2^11, spanning exponent and top 3 mantissa bits
NBINS = 1 << 11
NONE_ABOVE = np.int64(1) << 40  # a rank value no bit pattern reaches (no top cut)


@njit(inline="always")
def _bin_of_rank(hist, b, above, r):
    """Walking down from bin ``b`` (``above`` entries lie in higher bins): the bin holding
    the r-th largest (1-indexed) entry and the number of entries above that bin."""
    while above + hist[b] < r:
        above += hist[b]
        b -= 1
    return b, above


@njit(inline="always")
def _rank_in_bin(mags, n, b, above, r, cand):
    """The r-th largest (1-indexed) of ``mags[:n]`` (int32 bit patterns), which lies in bin
    ``b`` below ``above`` larger entries, and how many entries are strictly larger."""
    m = 0
    for j in range(n):
        if (mags[j] >> SHIFT) == b:
            cand[m] = mags[j]
            m += 1
    # the (r − above)-th largest among the m entries of bin b
    part = np.partition(cand[:m], m - (r - above))
    value = part[m - (r - above)]
    larger = above
    for i in range(m):
        larger += np.int64(cand[i] > value)
    return np.int64(value), larger


@njit(inline="always")
def _nth_tie(mags, n, value, nth):
    """Index of the nth (1-indexed) entry equal to ``value``: −1 for nth ≤ 0, n when there
    are fewer than nth."""
    if nth <= 0:
        return -1
    seen = 0
    for j in range(n):
        seen += np.int64(mags[j] == value)
        if seen == nth:
            return j
    return n


@njit(inline="always")
def _accumulate(acc, d, t, n, unit, weights):
    """Model t's term of ``_sparsify._sum_``: acc = δ_0·w_0 (δ_0 when w_0 = 1), then
    acc + δ_t or fma(δ_t, w_t, acc)."""
    if t == 0:
        if unit[0]:
            acc[:n] = d[:n]
        else:
            w0 = weights[0]
            for j in range(n):
                acc[j] = d[j] * w0
    elif unit[t]:
        for j in range(n):
            acc[j] = acc[j] + d[j]
    else:
        w = weights[t]
        for j in range(n):
            acc[j] = fma(d[j], w, acc[j])


@njit(inline="always")
def _band_row(d, width, top, h, mags, cand, hist):
    """Breadcrumbs' band on one row ``d[:width]`` in place (``_sparsify.band_trim_``): keep
    magnitude ranks top+1 .. h, δ·1 or δ·0 (dropped negatives are −0.0, as in torch);
    h ≤ top zeroes the row, top = 0 with h = width keeps it whole."""
    if h <= top:
        for j in range(width):
            d[j] = d[j] * np.float32(0.0)
        return
    if top == 0 and h == width:
        return
    largest = np.int32(0)
    for j in range(width):
        mags[j] = np.int32(f32_to_bits(abs(d[j])))
        largest = max(largest, mags[j])
    hist[:] = 0
    for j in range(width):
        hist[mags[j] >> SHIFT] += 1
    # one walk down the histogram from the largest entry's bin: the top cut, then the low one
    b, above = largest >> SHIFT, np.int64(0)
    top_value, top_larger = NONE_ABOVE, np.int64(0)
    if top > 0:
        b, above = _bin_of_rank(hist, b, above, top)
        top_value, top_larger = _rank_in_bin(mags, width, b, above, top, cand)
    low_value, low_larger = np.int64(-1), np.int64(0)
    if h < width:
        b, above = _bin_of_rank(hist, b, above, h)
        low_value, low_larger = _rank_in_bin(mags, width, b, above, h, cand)
    # ties at a cut rank by index: the first (top − top_larger) ties at top_value rank within
    # the dropped top, the first (h − low_larger) ties at low_value within the band
    last_top = _nth_tie(mags, width, top_value, top - top_larger)  # −1 without a top cut
    last_low = _nth_tie(mags, width, low_value, h - low_larger) if h < width else -1
    for j in range(width):
        m = np.int64(mags[j])
        drop = (m > top_value) | ((m == top_value) & (j <= last_top)) \
            | (m < low_value) | ((m == low_value) & (j > last_low))
        d[j] = d[j] * np.float32(not drop)


@njit(inline="always")
def _band_scratch(width):
    """Per-row buffers of :func:`_band_row`: bit patterns, bin candidates, histogram."""
    return np.empty(width, np.int32), np.empty(width, np.int32), np.zeros(NBINS, np.int64)


@njit(inline="always")
def _band_deltas(src, r0, width, n_top, hi, d, mags, cand, hist):
    """d[t, :width] = the banded δ_t = θ_t − θ_0 of the row starting at column ``r0``."""
    base = src[0, r0:r0 + width]
    for t in range(src.shape[0] - 1):
        row, dt = src[1 + t, r0:r0 + width], d[t]
        for j in range(width):
            dt[j] = widen(row[j]) - widen(base[j])
        _band_row(dt, width, n_top[t], hi[t], mags, cand, hist)


@njit(**JIT)
def band_sum_kernel(src, count, out, width, n_top, hi, unit, weights, post_div, lam):
    """Breadcrumbs on ``count // width`` rows of ``width``: δ_t = θ_t − θ_0, band mask per
    row (:func:`_band_row`), out = δ_0·w_0 then + δ_t or fma(δ_t, w_t, out), / Σw
    (``post_div``, 0 = none), ·λ, + θ_0."""
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d = np.empty((nexp, width), np.float32)
    acc = np.empty(width, np.float32)
    mags, cand, hist = _band_scratch(width)
    for r0 in range(0, count, width):
        _band_deltas(src, r0, width, n_top, hi, d, mags, cand, hist)
        for t in range(nexp):
            _accumulate(acc, d[t], t, width, unit, weights)
        sum_to_output(acc, width, src[0, r0:r0 + width], out[r0:r0 + width], post_div, lam)
    return True


@njit(**JIT)
def band_ties_kernel(src, count, out, width, n_top, hi, unit, weights, normalize,
                     min_weight, lam, weighted_vote, fix_index, fix_deltas, tally):
    """breadcrumbs_ties on ``count // width`` rows: the banded δ_t per row
    (:func:`_band_row`), then TIES' election and disjoint merge (``ties_core``: the paper or
    the weighted vote, as :func:`~modelalloy.kernels.elementwise.dare_ties_kernel`)."""
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d = np.empty((nexp, width), np.float32)
    mags, cand, hist = _band_scratch(width)
    gamma, acc, den, spread = (np.empty(width, np.float32), np.empty(width, np.float32),
                               np.empty(width, np.float32), np.empty(width, np.float32))
    for r0 in range(0, count, width):
        _band_deltas(src, r0, width, n_top, hi, d, mags, cand, hist)
        _elect_and_merge(d, width, r0, src[0], out, unit, weights, normalize, min_weight,
                         lam, weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den,
                         spread)
    return True


# --------------------------------------------------------------------------------------------
# DELLA: MagPrune per row (``_sparsify.magprune_``), then TIES or a weighted sum

RADIX_BITS = 11
RADIX = 1 << RADIX_BITS


@njit(inline="always")
def _stable_order(keys, n, order, spare, counts):
    """``order[:n]``: indices of ``keys[:n]`` (non-negative int32) sorted ascending, equal keys
    in index order — ``torch.sort(stable=True)``'s order — by an LSD radix sort of three
    11-bit digits (each pass stable, O(n))."""
    for j in range(n):
        order[j] = j
    src, dst = order, spare
    for shift in range(0, 33, RADIX_BITS):
        counts[:] = 0
        for j in range(n):
            counts[(keys[src[j]] >> shift) & (RADIX - 1)] += 1
        total = 0
        for b in range(RADIX):
            c = counts[b]
            counts[b] = total
            total += c
        for j in range(n):
            i = src[j]
            b = (keys[i] >> shift) & (RADIX - 1)
            dst[counts[b]] = i
            counts[b] += 1
        src, dst = dst, src
    return src  # three passes: the sorted indices end in ``spare``


@njit(inline="always")
def _magprune_row(d, n, uniforms, low, step, density, rescale, keys, order, spare, counts,
                  probs):
    """δ̃ = δ ⊙ m / π in place on one row ``d[:n]`` (``_sparsify.magprune_``): π from the rank
    r of |δ| in the row, π = r·step + low in float32 (a one-entry row: π = density); keep
    where the row's uniform draw is below π; ×(1/π) with ``rescale``, as torch's
    ``keep.div_(probs)`` then ``delta.mul_(keep)``."""
    if n == 1:
        probs[0] = density
    else:
        for j in range(n):
            keys[j] = np.int32(f32_to_bits(abs(d[j])))
        ranked = _stable_order(keys, n, order, spare, counts)
        for k in range(n):
            probs[ranked[k]] = np.float32(k) * step + low
    for j in range(n):
        keep = np.float32(uniforms[j] < probs[j])
        if rescale:
            keep = keep / probs[j]
        d[j] = d[j] * keep


@njit(inline="always")
def _della_deltas(src, r0, width, trims, uniforms, low, step, density, rescale, d, keys,
                  order, spare, counts, probs):
    """d[t, :width] = DELLA's δ̃_t on the row starting at column ``r0``."""
    base = src[0, r0:r0 + width]
    for t in range(src.shape[0] - 1):
        row = src[1 + t, r0:r0 + width]
        dt = d[t]
        for j in range(width):
            dt[j] = widen(row[j]) - widen(base[j])
        if trims[t]:
            _magprune_row(dt, width, uniforms[t, r0:r0 + width], low[t], step[t], density[t],
                          rescale, keys, order, spare, counts, probs)


@njit(inline="always")
def _della_scratch(nexp, width):
    return (np.empty((nexp, width), np.float32), np.empty(width, np.int32),
            np.empty(width, np.int64), np.empty(width, np.int64), np.zeros(RADIX, np.int64),
            np.empty(width, np.float32))


@njit(**JIT)
def della_kernel(src, count, out, width, trims, uniforms, low, step, density, rescale,
                 unit, weights, normalize, min_weight, lam, weighted_vote, fix_index,
                 fix_deltas, tally):
    """``della`` on ``count // width`` rows: MagPrune's δ̃_t per row (:func:`_magprune_row`),
    then TIES' election and disjoint merge (``ties_core``, as :func:`dare_ties_kernel`)."""
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d, keys, order, spare, counts, probs = _della_scratch(nexp, width)
    gamma, acc, den, spread = (np.empty(width, np.float32), np.empty(width, np.float32),
                               np.empty(width, np.float32), np.empty(width, np.float32))
    for r0 in range(0, count, width):
        _della_deltas(src, r0, width, trims, uniforms, low, step, density, rescale, d, keys,
                      order, spare, counts, probs)
        _elect_and_merge(d, width, r0, src[0], out, unit, weights, normalize, min_weight,
                         lam, weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den,
                         spread)
    return True


@njit(**JIT)
def della_sum_kernel(src, count, out, width, trims, uniforms, low, step, density, rescale,
                     unit, weights, post_div, lam):
    """``della_linear`` on ``count // width`` rows: MagPrune's δ̃_t, then out = δ̃_0·w_0 then
    + δ̃_t or fma(δ̃_t, w_t, out), / Σw (``post_div``, 0 = none), ·λ, + θ_0."""
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d, keys, order, spare, counts, probs = _della_scratch(nexp, width)
    acc = np.empty(width, np.float32)
    for r0 in range(0, count, width):
        _della_deltas(src, r0, width, trims, uniforms, low, step, density, rescale, d, keys,
                      order, spare, counts, probs)
        for t in range(nexp):
            _accumulate(acc, d[t], t, width, unit, weights)
        sum_to_output(acc, width, src[0, r0:r0 + width], out[r0:r0 + width], post_div, lam)
    return True
