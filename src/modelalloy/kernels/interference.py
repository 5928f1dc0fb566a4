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
from numba import njit

from modelalloy.kernels._numba import JIT, f32_to_bits
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
    """
    n = x.shape[0]
    mask = np.zeros(n, np.bool_)
    clash = 0
    for e in range(count):
        mtl = np.float32(0.0)
        pos = False
        neg = False
        for i in range(n):
            v = x[i, e]
            mtl += v
            pos |= v > 0
            neg |= v < 0
            mag = abs(v)
            keep = mag > thresholds[i]
            if not keep and mag == thresholds[i] and ties_left[i] > 0:
                keep = True
                ties_left[i] -= 1
            mask[i] = keep
        if pos and neg:
            clash += 1
        tie_code = 0
        tall_code = 0
        for i in range(n):
            v = x[i, e]
            tall = abs(v) > lam * abs(mtl - v)
            if coded:
                tie_code |= np.int64(mask[i]) << i
                tall_code |= np.int64(tall) << i
            else:
                for j in range(n):
                    if mask[i] and mask[j]:
                        ties_and[i, j] += 1
                    if tall and abs(x[j, e]) > lam * abs(mtl - x[j, e]):
                        tall_and[i, j] += 1
        if coded:
            ties_hist[tie_code] += 1
            tall_hist[tall_code] += 1
        if vote != VOTE_NONE:
            total = np.float32(0.0)
            for i in range(n):
                voter = x[i, e] if vote == VOTE_WHOLE or mask[i] else np.float32(0.0)
                total += voter * coeff[i] if weighted else voter
            up = total >= 0
            for i in range(n):
                v = x[i, e]
                voter = v if vote == VOTE_WHOLE or mask[i] else np.float32(0.0)
                if (up and voter > 0) or (not up and voter < 0):
                    kept[i] += np.float64(v * v)
    conflicts[0] += clash

