"""Fused kernels of ``modelalloy inspect``'s passes over a tensor's task vectors.

``inspection.metrics`` reads a tensor's task vectors τ as (n × C) float32 chunks and makes
three passes: the two passes of the sliced TIES trim (a histogram of |τ_i|, then the values of
the bin holding each cut-off), then one pass for every measure. With torch ops each step is a
pass over the chunk (about 25 for the last pass); these kernels do a pass's work in one loop
over the chunk's columns. The float32 operations are the torch path's (``Σ_j τ_j`` summed in
row order, ``λ·|Σ_j τ_j − τ_i|`` in float32), the trim masks the same by construction (keep
|τ| > v, and ties at v while ties are left, in index order), so the integer counts agree with
the torch path's; only the float64 accumulations differ in rounding (tests/inspection).
"""

from __future__ import annotations

import numpy as np

from modelalloy.kernels._numba import JIT, f32_to_bits, njit
from modelalloy.methods.orderstats import MAG_SHIFT

# which experts' share surviving the method the last pass adds up
VOTE_NONE, VOTE_TRIMMED, VOTE_WHOLE = 0, 1, 2


@njit(**JIT)
def magnitude_counts(x, count, trims, hist):
    """Pass 1: ``hist[i, key(|x[i, e]|)] += 1`` for the rows that trim (``trims[i]``)."""
    for i in range(x.shape[0]):
        if not trims[i]:
            continue
        row = x[i]
        h = hist[i]
        for e in range(count):
            h[(f32_to_bits(row[e]) & np.uint32(0x7FFFFFFF)) >> MAG_SHIFT] += 1


@njit(**JIT)
def bin_values(row, count, key, out):
    """Pass 2: the |values| of ``row`` whose magnitude key is ``key``, written to ``out`` in
    index order; returns how many."""
    found = 0
    k = np.uint32(key)
    for e in range(count):
        bits = f32_to_bits(row[e]) & np.uint32(0x7FFFFFFF)
        if (bits >> MAG_SHIFT) == k:
            out[found] = abs(row[e])
            found += 1
    return found


BLOCK = 512  # columns per block: the loops over a block's rows vectorize


@njit(**{**JIT, "fastmath": True})
def _sum64(values, count):
    """Σ of the first ``count`` float32 values in float64, in any order (so it vectorizes)."""
    acc = 0.0
    for e in range(count):
        acc += np.float64(values[e])
    return acc


@njit(**JIT)
def measure_pass(x, count, thresholds, ties_left, lam, coeff, weighted, vote, coded,
                 ties_hist, tall_hist, ties_and, tall_and, kept, conflicts):
    """Pass 3 over the first ``count`` columns of ``x`` (n × C float32 τ).

    Per column: the TIES masks m_i = |τ_i| > v_i, or |τ_i| = v_i while ``ties_left[i]`` > 0
    (decremented: the ties kept in index order, across chunks); the TALL masks
    |τ_i| > λ·|Σ_j τ_j − τ_i|; a sign conflict when some τ_i > 0 and some τ_j < 0; with
    ``vote`` the elected sign γ of Σ_j (w_j) τ̂_j (τ̂ = m·τ for VOTE_TRIMMED, τ for VOTE_WHOLE)
    and ``kept[i] += τ_i²`` where sign(τ̂_i) = γ. Mask pairs go to ``ties_hist``/``tall_hist``
    (the code Σ_i m_i 2^i, when ``coded``) or to ``ties_and``/``tall_and`` (|m_i ∧ m_j|).
    Work goes a block of columns at a time, row by row, so the inner loops vectorize.
    """
    n = x.shape[0]
    mask = np.zeros((n, BLOCK), np.bool_)
    tall = np.zeros((n, BLOCK), np.bool_)
    mtl = np.zeros(BLOCK, np.float32)
    total = np.zeros(BLOCK, np.float32)
    pos = np.zeros(BLOCK, np.int32)
    neg = np.zeros(BLOCK, np.int32)
    square = np.zeros(BLOCK, np.float32)
    tie_code = np.zeros(BLOCK, np.int64)
    tall_code = np.zeros(BLOCK, np.int64)
    clash = 0
    for s in range(0, count, BLOCK):
        c = min(BLOCK, count - s)
        mtl[:] = 0
        total[:] = 0
        pos[:] = 0
        neg[:] = 0
        tie_code[:] = 0
        tall_code[:] = 0
        for i in range(n):
            row = x[i, s:s + c]
            thr = thresholds[i]
            m = mask[i]
            for e in range(c):
                v = row[e]
                mtl[e] += v
                pos[e] |= v > 0
                neg[e] |= v < 0
                m[e] = abs(v) > thr
            if ties_left[i] > 0:  # ties at the threshold, in index order
                for e in range(c):
                    if abs(row[e]) == thr and ties_left[i] > 0:
                        m[e] = True
                        ties_left[i] -= 1
        for e in range(c):
            clash += pos[e] & neg[e]
        for i in range(n):
            row = x[i, s:s + c]
            m = mask[i]
            t = tall[i]
            bit = np.int64(1) << i
            for e in range(c):
                t[e] = abs(row[e]) > lam * abs(mtl[e] - row[e])
            if coded:
                for e in range(c):
                    tie_code[e] |= np.int64(m[e]) * bit
                    tall_code[e] |= np.int64(t[e]) * bit
        if coded:
            for e in range(c):
                ties_hist[tie_code[e]] += 1
                tall_hist[tall_code[e]] += 1
        else:
            for i in range(n):
                for j in range(n):
                    both = 0
                    either = 0
                    for e in range(c):
                        both += mask[i, e] & mask[j, e]
                        either += tall[i, e] & tall[j, e]
                    ties_and[i, j] += both
                    tall_and[i, j] += either
        if vote != VOTE_NONE:
            whole = vote == VOTE_WHOLE
            for i in range(n):
                row = x[i, s:s + c]
                m = mask[i]
                w = coeff[i] if weighted else np.float32(1.0)  # v·1 is v: the plain Σ
                for e in range(c):
                    total[e] += row[e] * np.float32(whole or m[e]) * w
            for i in range(n):
                row = x[i, s:s + c]
                m = mask[i]
                for e in range(c):
                    v = row[e]
                    voter = v * np.float32(whole or m[e])
                    agree = (voter > 0) == (total[e] >= 0) and voter != 0
                    square[e] = v * v * np.float32(agree)
                kept[i] += _sum64(square, c)
    conflicts[0] += clash
