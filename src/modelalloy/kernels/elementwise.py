"""Fused slice kernels of the elementwise methods: linear, task arithmetic, DARE (linear, TIES).

Every kernel reads ``src`` (one row per source, base first; stored bits: uint16 for bfloat16,
or float32) over the first ``count`` columns, writes ``out`` (uint16 bfloat16 bits or float32)
and returns how many inputs were NaN/Inf (the engine then falls back to the whole-tensor path,
which reports them). The float32 operations and their order are those of the torch
implementations in ``methods/`` (see each function), so the bits agree:

- ``Σ``-style accumulations: ``acc + x`` for a unit weight, ``fma(x, w, acc)`` otherwise
  (torch's ``add_(x, alpha=w)``);
- scalars are float32 (torch casts a Python scalar to the tensor's dtype);
- −0.0 is kept where torch keeps it (``relu`` of −0.0 is −0.0, ``d·0`` of a negative d is −0.0).

Work goes in chunks of ``CHUNK`` elements so the per-model rows stay in L1/L2 and the loops over
a chunk vectorize; the SFC64 draws advance four streams at a time (``_numba.sfc64_fill_rows``).
"""

from __future__ import annotations

import math

import numpy as np

from modelalloy.kernels._numba import (
    JIT,
    any_nonfinite,
    f32_to_bits,
    fma,
    is_nonfinite,
    narrow,
    njit,
    sfc64_fill_rows,
    sign,
    widen,
)
from modelalloy.methods.orderstats import MAG_BINS, MAG_SHIFT

CHUNK = 2048  # even, so every chunk but a slice's last starts on a fresh 64-bit draw

# Per-model weight kinds (what the torch code does with the weight)
SKIP, UNIT, SCALED = 0, 1, 2


@njit(**JIT)
def weighted_kernel(src, count, out, has_base, kinds, weights, post_div, post_scale):
    """linear and task arithmetic (``_sparsify.weighted_sum`` and its callers).

    acc = τ_f·w_f for the first model f with a nonzero weight (τ = θ − θ_0 with a base, else
    θ; no multiply for w = 1), then acc = acc + τ or fma(τ, w, acc) per later nonzero weight;
    all-zero weights give 0. Then acc / ``post_div`` (linear's normalisation; 0 = none),
    acc · ``post_scale`` (task arithmetic's λ/Σw; 1 = none) and + θ_0 with a base.
    """
    nsrc = src.shape[0]
    first = 1 if has_base else 0
    if any_nonfinite(src, count):
        return False
    acc = np.empty(CHUNK, np.float32)
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        started = False
        o = out[c0:c0 + n]
        for t in range(nsrc - first):
            kind = kinds[t]
            if kind == SKIP:
                continue
            w = weights[t]
            row = src[first + t, c0:c0 + n]
            if has_base:
                base = src[0, c0:c0 + n]
                if not started:
                    for j in range(n):
                        acc[j] = widen(row[j]) - widen(base[j])
                    if kind == SCALED:
                        for j in range(n):
                            acc[j] = acc[j] * w
                elif kind == UNIT:
                    for j in range(n):
                        acc[j] = acc[j] + (widen(row[j]) - widen(base[j]))
                else:
                    for j in range(n):
                        acc[j] = fma(widen(row[j]) - widen(base[j]), w, acc[j])
            else:
                if not started:
                    if kind == SCALED:
                        for j in range(n):
                            acc[j] = widen(row[j]) * w
                    else:
                        for j in range(n):
                            acc[j] = widen(row[j])
                elif kind == UNIT:
                    for j in range(n):
                        acc[j] = acc[j] + widen(row[j])
                else:
                    for j in range(n):
                        acc[j] = fma(widen(row[j]), w, acc[j])
            started = True
        if not started:
            acc[:n] = 0.0
        if post_div != 0:
            for j in range(n):
                acc[j] = acc[j] / post_div
        if post_scale != 1:
            for j in range(n):
                acc[j] = acc[j] * post_scale
        if has_base:
            base = src[0, c0:c0 + n]
            for j in range(n):
                acc[j] = acc[j] + widen(base[j])
        for j in range(n):
            o[j] = narrow(acc[j], o[0])
    return True


@njit(**JIT)
def difference_rows_kernel(src, count, rows):
    """rows[t − 1, :count] = θ_t − θ_0 for every source t after the base (row 0), each a
    float32 difference widened to float64 (``torch.sub`` of the float32 inputs); False when an
    input is NaN/Inf. The rows of Model Stock's Gram pass (``methods.gram``)."""
    if any_nonfinite(src, count):
        return False
    for t in range(1, src.shape[0]):
        for j in range(count):
            rows[t - 1, j] = widen(src[t, j]) - widen(src[0, j])
    return True


# DARE drop modes per model (``_sparsify.dare_``)
KEEP_ALL, DROP_ALL, DROP_RANDOM = 0, 1, 2


@njit(inline="always")
def _draw_scratch(nexp):
    """The keep draws' buffers: words (models × CHUNK, plus the spare row of
    ``sfc64_fill_rows``), its 4 × 4 lane states and 4 row numbers, and CHUNK bytes for the
    0/1 flags of bits to pack."""
    return (np.empty((nexp + 1, CHUNK), np.uint32), np.empty((4, 4), np.uint64),
            np.empty(4, np.int64), np.empty(CHUNK, np.uint8))


# 8 bytes of 0/1 (a little-endian uint64) times this: byte k's bit lands at bit 56 + k, and
# no two partial products meet (8k − 7j is distinct for every k, j < 8), so nothing carries
_GATHER_BITS = np.uint64(0x0102040810204080)
@njit(inline="always")
def _pack_flags(flags, n, bits, at):
    """bits[at + j // 8] bit j % 8 = flags[j] (0 or 1) for j < n: a chunk's keep mask as
    bits, 8 elements a byte, the first element in the lowest bit (NumPy's
    ``bitorder='little'``); ``flags`` holds at least n rounded up to 8 bytes."""
    whole = -(-n // 8)
    for j in range(n, 8 * whole):
        flags[j] = 0
    octets = flags[:8 * whole].view(np.uint64)
    for q in range(whole):
        bits[at + q] = np.uint8((octets[q] * _GATHER_BITS) >> np.uint64(56))


@njit(inline="always")
def _dare_deltas(src, c0, n, modes, random, states, thresholds, rescale, inv_density, draw,
                 kept, d):
    """d[t, :n] = DARE's δ̃_t on this chunk: (θ_t − θ_0)·m_t, then ·(1/density) (float32).
    ``random`` lists the models that drop at random; their keep masks m_t are drawn into
    ``draw``'s words, or, when ``kept`` has columns, read from it: the slice's masks as 0/1
    bytes, row i for ``random[i]`` (the L1 pass's bits, unpacked)."""
    base = src[0, c0:c0 + n]
    from_kept = kept.shape[1] > 0
    words = draw[0]
    if not from_kept:
        sfc64_fill_rows(states, random, words, n, draw[1], draw[2])
    i = 0
    for t in range(d.shape[0]):
        row = src[1 + t, c0:c0 + n]
        mode = modes[t]
        if mode == DROP_ALL:
            d[t, :n] = 0.0
            continue
        if mode == KEEP_ALL:
            for j in range(n):
                d[t, j] = widen(row[j]) - widen(base[j])
            continue
        thr, inv = thresholds[t], inv_density[t]
        if from_kept:
            mask = kept[i, c0:c0 + n]
            if rescale:
                for j in range(n):
                    d[t, j] = ((widen(row[j]) - widen(base[j])) * np.float32(mask[j])) * inv
            else:
                for j in range(n):
                    d[t, j] = (widen(row[j]) - widen(base[j])) * np.float32(mask[j])
        elif rescale:  # ((θ − θ_0)·m)·(1/density): two roundings, as torch's two multiplies
            for j in range(n):
                d[t, j] = ((widen(row[j]) - widen(base[j])) * np.float32(words[t, j] < thr)) * inv
        else:
            for j in range(n):
                d[t, j] = (widen(row[j]) - widen(base[j])) * np.float32(words[t, j] < thr)
        i += 1


@njit(inline="always")
def _add_exact_sum(bins, total, f):
    """An exact chunk sum ``total`` (float64) = S·2^(f − 150), S < 2^52 an integer, into the
    bins at exponent field f: S's low 32 bits in row 0, its high bits in row 1 (weight 2^32)."""
    steps = np.int64(total * math.ldexp(1.0, 150 - np.int64(f)))  # exact: a power of 2
    bins[0, f] += steps & np.int64(0xFFFFFFFF)
    bins[1, f] += steps >> np.int64(32)


L1_EXACT = 2.0 ** 52  # a float64 sum of multiples of q stays exact below 2^53·q


@njit(**JIT, fastmath={"reassoc"})
def dare_l1_kernel(src, count, modes, states, thresholds, before, after, kept, kept_at):
    """DARE's L1 pass on one slice (``methods.dare.gather_l1_sums``): for each model t that
    drops at random, the exact L1 bins (``methods._l1``) of |θ_t − θ_0| into ``before[t]`` and
    of |(θ_t − θ_0)·m_t| into ``after[t]``, the keep draws m_t continuing from ``states``.
    When ``kept`` has columns, m_t is also kept there as bits for the merge pass (row i for
    the i-th model that drops at random, the slice's first byte at ``kept_at``: see
    :func:`_pack_flags`). False (nothing added) when an input is NaN/Inf.

    Per chunk, |δ| are summed in float64 with the smallest and largest nonzero |δ|: every |δ|
    is a multiple of q, the smallest one's unit in the last place, so while the sum stays
    below 2^52·q every partial sum is exact, in any order (the adds are reassociated freely,
    to vectorize); the sum then goes to the bins as an integer count of q. A chunk whose
    magnitudes span too wide a range (about 2^18) goes element by element into the bins."""
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    words, lanes, rows, flags = _draw_scratch(nexp)
    random = np.nonzero(modes == DROP_RANDOM)[0]
    none = np.uint32(0xFFFFFFFF)
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        sfc64_fill_rows(states, random, words, n, lanes, rows)
        base = src[0, c0:c0 + n]
        for i in range(random.size):
            t = random[i]
            row, thr, keep = src[1 + t, c0:c0 + n], thresholds[t], words[t]
            whole, survivors = 0.0, 0.0
            low = none
            for j in range(n):
                x = abs(widen(row[j]) - widen(base[j]))
                bits = f32_to_bits(x)
                low = min(low, bits if bits != 0 else none)
                v = np.float64(x)
                whole += v
                kept_j = keep[j] < thr
                flags[j] = np.uint8(kept_j)
                survivors += v if kept_j else 0.0
            if kept.shape[1] > 0:
                _pack_flags(flags, n, kept[i], kept_at + c0 // 8)
            if low == none:
                continue  # all zero
            f = max(low >> np.uint32(23), np.uint32(1))  # q = 2^(f − 150)
            if whole < math.ldexp(L1_EXACT, np.int64(f) - 150):
                _add_exact_sum(before[t], whole, f)
                _add_exact_sum(after[t], survivors, f)
                continue
            for j in range(n):  # too wide a range for one float64: one bin per exponent
                x = widen(row[j]) - widen(base[j])
                bits = f32_to_bits(x) & np.uint32(0x7FFFFFFF)
                e = bits >> np.uint32(23)
                m = np.int64((bits & np.uint32(0x7FFFFF)) | (np.uint32(e > 0) << np.uint32(23)))
                before[t, 0, e] += m
                after[t, 0, e] += m * np.int64(keep[j] < thr)
    return True


@njit(**JIT)
def dare_linear_kernel(src, count, out, modes, states, thresholds, rescale, inv_density,
                       kept, unit, weights, post_div, lam):
    """dare_linear: δ̃_t as in :func:`_dare_deltas` (masks drawn, or read from ``kept``),
    then ``_sparsify._sum_`` (acc = δ̃_0·w_0, acc + δ̃_t or fma(δ̃_t, w_t, acc)), / Σw
    (``post_div``, 0 = none), ·λ, + θ_0."""
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d = np.empty((nexp, CHUNK), np.float32)
    draw = _draw_scratch(nexp)
    random = np.nonzero(modes == DROP_RANDOM)[0]
    base = src[0]
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        _dare_deltas(src, c0, n, modes, random, states, thresholds, rescale, inv_density,
                     draw, kept, d)
        acc = d[0]
        if not unit[0]:
            for j in range(n):
                acc[j] = acc[j] * weights[0]
        for t in range(1, nexp):
            w = weights[t]
            if unit[t]:
                for j in range(n):
                    acc[j] = acc[j] + d[t, j]
            else:
                for j in range(n):
                    acc[j] = fma(d[t, j], w, acc[j])
        sum_to_output(acc, n, base[c0:c0 + n], out[c0:c0 + n], post_div, lam)
    return True


@njit(inline="always")
def sum_to_output(acc, n, base, out, post_div, lam):
    """out = (Σ / ``post_div`` (0: none))·λ + θ_0, cast to the output: the end of
    ``_sparsify._sum_``'s callers (dare_linear, breadcrumbs)."""
    for j in range(n):
        v = acc[j]
        if post_div != 0:
            v = v / post_div
        out[j] = narrow(v * lam + widen(base[j]), out[0])


@njit(inline="always")
def _merge_scratch(nexp):
    """Chunk buffers of :func:`_elect_and_merge`: δ̃ (models × CHUNK), γ, sums, weights of
    the agreeing models, and |δ̃| sums."""
    chunk = np.empty((4, CHUNK), np.float32)
    return np.empty((nexp, CHUNK), np.float32), chunk[0], chunk[1], chunk[2], chunk[3]


@njit(inline="always")
def _elect_and_merge(d, n, c0, base, out, unit, weights, normalize, min_weight, lam,
                     weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den, spread):
    """TIES' election and disjoint merge of the chunk's δ̃ (``d``, models × n), written to
    ``out``; adds the chunk's Σ sign(Σ_t δ̃_t) to ``tally[0]`` and its fix-ups after the
    ``tally[1]`` already listed. See :func:`dare_ties_kernel`."""
    # The loops run over the chunk with the model loop outside, so they vectorize.
    for t in range(d.shape[0]):
        _add_vote(d[t], n, t, weights[t], weighted_vote, acc, spread)
    _vote_and_merge(d, n, c0, base, out, unit, weights, normalize, min_weight, lam,
                    weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den, spread)


@njit(inline="always")
def _add_vote(row, n, t, w, weighted_vote, acc, spread):
    """Model t's δ̃ (``row``) into the vote's sums, in model order: Σ_t w_t·δ̃_t by fma
    (weighted vote), or Σ_t δ̃_t and Σ_t |δ̃_t| (paper vote)."""
    if weighted_vote:
        if t == 0:
            for j in range(n):
                acc[j] = row[j] * w
        else:
            for j in range(n):
                acc[j] = fma(row[j], w, acc[j])
    elif t == 0:
        for j in range(n):
            acc[j] = row[j]
            spread[j] = abs(row[j])
    else:
        for j in range(n):
            acc[j] = acc[j] + row[j]
            spread[j] = spread[j] + abs(row[j])


@njit(inline="always")
def _vote_and_merge(d, n, c0, base, out, unit, weights, normalize, min_weight, lam,
                    weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den, spread):
    """:func:`_elect_and_merge` once the vote's sums (:func:`_add_vote`) are in ``acc`` and
    ``spread``."""
    nexp = d.shape[0]
    signs = 0
    nfix = tally[1]
    if weighted_vote:
        for j in range(n):
            gamma[j] = np.float32(-1.0) if acc[j] < 0 else np.float32(1.0)
    else:
        undecided = 0
        b = base[c0:c0 + n]
        for j in range(n):
            s = sign(acc[j])
            signs += np.int64(s)
            gamma[j] = s if s != 0 else np.float32(1.0)
            # a zero sum that some δ̃_t ≠ 0 made (spread ≠ 0), or on a base of −0.0 (the
            # fill gives the zero's sign): its γ waits for the majority
            negative_zero = f32_to_bits(widen(b[j])) == np.uint32(0x80000000)
            flag = np.float32((s == 0) & ((spread[j] != 0) | negative_zero))
            spread[j] = flag
            undecided += np.int64(flag)
        if undecided:
            for j in range(n):
                if spread[j] != 0:
                    fix_index[nfix] = c0 + j
                    for t in range(nexp):
                        fix_deltas[t, nfix] = d[t, j]
                    nfix += 1
    # a_t = relu(δ̃_t·γ) (relu keeps −0.0, as torch's does), summed as it is made, with the
    # normalisation's Σ_t sign(a_t)·w_t beside it
    for t in range(nexp):
        w = weights[t]
        row = d[t]
        if t == 0:
            if normalize:
                for j in range(n):
                    x = row[j] * gamma[j]
                    a = np.float32(0.0) if x < 0 else x
                    acc[j] = a if unit[0] else a * w
                    den[j] = sign(a) if unit[0] else sign(a) * w
            else:
                for j in range(n):
                    x = row[j] * gamma[j]
                    a = np.float32(0.0) if x < 0 else x
                    acc[j] = a if unit[0] else a * w
        elif unit[t]:
            if normalize:
                for j in range(n):
                    x = row[j] * gamma[j]
                    a = np.float32(0.0) if x < 0 else x
                    acc[j] = acc[j] + a
                    den[j] = fma(sign(a), w, den[j])
            else:
                for j in range(n):
                    x = row[j] * gamma[j]
                    a = np.float32(0.0) if x < 0 else x
                    acc[j] = acc[j] + a
        elif normalize:
            for j in range(n):
                x = row[j] * gamma[j]
                a = np.float32(0.0) if x < 0 else x
                acc[j] = fma(a, w, acc[j])
                den[j] = fma(sign(a), w, den[j])
        else:
            for j in range(n):
                x = row[j] * gamma[j]
                a = np.float32(0.0) if x < 0 else x
                acc[j] = fma(a, w, acc[j])
    if normalize:
        for j in range(n):
            acc[j] = acc[j] / max(den[j], min_weight)
    b, o = base[c0:c0 + n], out[c0:c0 + n]
    for j in range(n):
        v = acc[j] * gamma[j]
        if lam != 1:
            v = v * lam
        o[j] = narrow(v + widen(b[j]), o[0])
    tally[0] += signs
    tally[1] = nfix


@njit(**JIT)
def dare_ties_kernel(src, count, out, modes, states, thresholds, rescale, inv_density,
                     kept, unit, weights, normalize, min_weight, lam, weighted_vote,
                     fix_index, fix_deltas, tally):
    """dare_ties on one slice: δ̃_t as in :func:`_dare_deltas` (masks drawn, or read from
    ``kept``), then TIES' election and
    disjoint merge (``methods.ties.ties_core`` with ``_sparsify.elect_sign``/``combine_``).

    Paper vote: γ = sign(Σ_t δ̃_t) summed left to right, zero sums take +1 (the slice's
    provisional majority, as ``ties.paper_vote_slice``); ``tally[0]`` += Σ sign(Σ_t δ̃_t), and
    every element whose sum is 0 while some δ̃_t ≠ 0 or its base is −0.0 (the fill then gives
    the zero's sign) is listed in ``fix_index`` (its δ̃ in
    ``fix_deltas``, count in ``tally[1]``) for the whole-tensor majority fix-up. Weighted vote:
    γ = +1 where fma-accumulated Σ_t w_t δ̃_t ≥ 0, else −1.
    Merge: a_t = relu(δ̃_t·γ); out = a_0·w_0 then + a_t or fma(a_t, w_t, out); with
    ``normalize`` den = sign(a_0)·w_0 then fma(sign(a_t), w_t, den), clamped to the smallest
    positive weight, out / den; then out·γ, ·λ (if λ ≠ 1), + θ_0.
    """
    if any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d, gamma, acc, den, spread = _merge_scratch(nexp)
    draw = _draw_scratch(nexp)
    random = np.nonzero(modes == DROP_RANDOM)[0]
    base = src[0]
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        _dare_deltas(src, c0, n, modes, random, states, thresholds, rescale, inv_density,
                     draw, kept, d)
        _elect_and_merge(d, n, c0, base, out, unit, weights, normalize, min_weight, lam,
                         weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den, spread)
    return True


# TIES trim modes per model (``orderstats.SlicedTopK``)
TRIM_NONE, TRIM_ALL, TRIM_TOP_K = 0, 1, 2
BIN_SHIFT = MAG_SHIFT  # orderstats.magnitude_keys: the upper 16 bits of |δ|'s float32 pattern
NBINS = MAG_BINS


@njit(inline="always")
def _key(x, b):
    """The histogram bin of |x − b| (float32): the upper 16 bits of its bit pattern."""
    return f32_to_bits(abs(x - b)) >> BIN_SHIFT


@njit(inline="always")
def _count_rows(src, count, models, first, group, hist):
    """Histograms of |θ_t − θ_0|'s keys for ``group`` (1 to 3) models ``models[first:]``, in
    one loop: consecutive entries often share a bin, and each increment waits for the last
    one to the same counter; three models' counters are independent chains that overlap.
    Returns 1 if any of their inputs is NaN/Inf."""
    bad = np.uint32(0)
    base = src[0, :count]
    t0 = models[first]
    r0, h0 = src[1 + t0, :count], hist[t0]
    if group == 1:
        for j in range(count):
            x0 = widen(r0[j])
            bad |= is_nonfinite(x0)
            h0[_key(x0, widen(base[j]))] += 1
        return bad
    t1 = models[first + 1]
    r1, h1 = src[1 + t1, :count], hist[t1]
    if group == 2:
        for j in range(count):
            b, x0, x1 = widen(base[j]), widen(r0[j]), widen(r1[j])
            bad |= is_nonfinite(x0) | is_nonfinite(x1)
            h0[_key(x0, b)] += 1
            h1[_key(x1, b)] += 1
        return bad
    t2 = models[first + 2]
    r2, h2 = src[1 + t2, :count], hist[t2]
    for j in range(count):
        b, x0, x1, x2 = widen(base[j]), widen(r0[j]), widen(r1[j]), widen(r2[j])
        bad |= is_nonfinite(x0) | is_nonfinite(x1) | is_nonfinite(x2)
        h0[_key(x0, b)] += 1
        h1[_key(x1, b)] += 1
        h2[_key(x2, b)] += 1
    return bad


@njit(**JIT)
def ties_count_kernel(src, count, trims, hist):
    """TIES' first pass on one slice: ``hist[t]`` += the histogram of |θ_t − θ_0|'s bin keys,
    for the models that trim, up to three models per loop (:func:`_count_rows`). False on a
    NaN/Inf input (the engine then merges the tensor whole; counts made are discarded)."""
    bad = np.uint32(0)
    base = src[0, :count]
    for j in range(count):
        bad |= is_nonfinite(widen(base[j]))
    for t in range(src.shape[0] - 1):
        if not trims[t]:  # checked here; the trimmed rows are checked as they are counted
            row = src[1 + t, :count]
            for j in range(count):
                bad |= is_nonfinite(widen(row[j]))
    models = np.nonzero(trims)[0]
    first = 0
    while first < models.size:
        group = min(3, models.size - first)
        bad |= _count_rows(src, count, models, first, group, hist)
        first += group
    return bad == 0


@njit(**JIT)
def ties_collect_kernel(src, count, bins, values, found):
    """TIES' second pass on one slice: the |θ_t − θ_0| whose bin key is ``bins[t]`` (−1:
    none) into ``values[t, :found[t]]``. Keys go into a chunk buffer first (one vectorized
    loop), then a scan picks the few in the bin."""
    keys = np.empty(CHUNK, np.uint32)
    for t in range(src.shape[0] - 1):
        found[t] = 0
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        base = src[0, c0:c0 + n]
        for t in range(src.shape[0] - 1):
            if bins[t] < 0:
                continue
            row, b, m = src[1 + t, c0:c0 + n], np.uint32(bins[t]), found[t]
            for j in range(n):
                keys[j] = _key(widen(row[j]), widen(base[j]))
            for j in range(n):
                if keys[j] == b:
                    values[t, m] = abs(widen(row[j]) - widen(base[j]))
                    m += 1
            found[t] = m


@njit(inline="always")
def _trim_chunk(d, n, v, left):
    """d[:n] trimmed in place to |d| > v, plus the first ``left`` entries with |d| = v in
    index order (d·1 or d·0); returns how many ties at v are still to keep. The usual chunk
    has no tie left to keep, or fewer ties than ``left``: one vectorized pass then; only a
    chunk where the count runs out goes element by element."""
    ties = 0
    if left > 0:
        for j in range(n):
            ties += np.int64(abs(d[j]) == v)
    if left == 0 or ties == 0:
        for j in range(n):
            d[j] = d[j] * np.float32(abs(d[j]) > v)
    elif ties <= left:
        for j in range(n):
            d[j] = d[j] * np.float32(abs(d[j]) >= v)
        left -= ties
    else:
        for j in range(n):
            mag = abs(d[j])
            keep = mag > v
            if mag == v and left > 0:
                keep = True
                left -= 1
            d[j] = d[j] * np.float32(keep)
    return left


@njit(**JIT)
def ties_kernel(src, count, out, modes, thresholds, ties_left, checked, unit, weights,
                normalize, min_weight, lam, weighted_vote, fix_index, fix_deltas, tally):
    """TIES on one slice, after the two counting passes: τ_t = θ_t − θ_0 trimmed to the
    whole tensor's top k (``SlicedTopK.trim_``: |τ| > v, or |τ| = v while ``ties_left[t]``
    > 0, counted down in index order; τ·1 or τ·0), then :func:`_elect_and_merge`. With
    ``checked`` a counting pass has already found every input finite."""
    if not checked and any_nonfinite(src, count):
        return False
    nexp = src.shape[0] - 1
    d, gamma, acc, den, spread = _merge_scratch(nexp)
    base = src[0]
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        b = base[c0:c0 + n]
        for t in range(nexp):
            row, dt, v = src[1 + t, c0:c0 + n], d[t], thresholds[t]
            if modes[t] == TRIM_ALL:
                dt[:n] = 0.0
            else:  # (τ and its trim in one loop measured slower: 0.040 against 0.036 s)
                for j in range(n):
                    dt[j] = widen(row[j]) - widen(b[j])
                if modes[t] == TRIM_TOP_K:
                    ties_left[t] = _trim_chunk(dt, n, v, ties_left[t])
            _add_vote(dt, n, t, weights[t], weighted_vote, acc, spread)
        _vote_and_merge(d, n, c0, base, out, unit, weights, normalize, min_weight, lam,
                        weighted_vote, fix_index, fix_deltas, tally, gamma, acc, den, spread)
    return True
