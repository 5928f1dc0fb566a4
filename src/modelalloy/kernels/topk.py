"""TIES' tensor-wide top k from a sample and one bracketed counting pass (the fused path).

TIES keeps, per model t, exactly the k = int(density·n) largest |τ_t| of a tensor, ties at the
cut-off value v in flat index order (``orderstats.SlicedTopK``). Seen a slice at a time, the
exact v takes a histogram pass over every element, then a pass that gathers the cut-off bin's
values. Here one cheap pass and one counting pass give the same (k, v, ties to keep):

1. **Sample** every ``STRIDE``-th element of the tensor (a prime stride, so matrix columns of
   any power-of-two width are all visited) into a histogram of |τ|'s bin keys (the upper 16
   bits of the float32 pattern, ``orderstats.magnitude_keys``).
2. **Bracket.** The cut-off's descending rank in a sample of m elements is about q·m with
   q = k/n, with a standard deviation σ = √(m·q·(1 − q)). The bins that hold the sample's
   ranks q·m ∓ (Z·σ + 1) bound an interval [lo, hi] of float32 patterns that holds v unless the
   sample was very unrepresentative.
3. **Count** every element once: a_t = #{|τ_t| > hi} and an exact histogram of the patterns in
   [lo, hi]. Walking that histogram down from hi, v is the first pattern where the running
   count a_t + Σ reaches k; the elements above it number a_t + Σ before it, and
   k − #{|τ_t| > v} ties at v are kept.

The walk proves itself: when a_t ≥ k or the bracket holds fewer than k − a_t elements, v lies
outside it and the kernel runs the two exact passes instead (:class:`SampledTopK.missed`). So the
sample steers only the speed, never the result, which equals ``SlicedTopK``'s bit for bit.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np

from modelalloy.kernels._numba import JIT, f32_to_bits, is_nonfinite, njit, trailing_zeros, widen
from modelalloy.methods.orderstats import MAG_BINS, MAG_SHIFT

STRIDE = 61  # prime: visits every column of a matrix whose width it does not divide
Z = 4.5  # the bracket's half-width in standard deviations of the sampled cut-off's rank
MAX_BINS = 4096  # the widest bracket, in bins of 2^16 patterns, counted per bin
SLOTS = 16  # bins counted pattern by pattern (2 MB per model): the likeliest to hold the cut-off
MIN_SAMPLE = 1024  # a smaller sample gives too wide a bracket: the exact passes run instead
MAX_NUMEL = (1 << 31) - 1  # the counts are int32
CHUNK = 2048

@njit(**JIT)
def ties_sample_kernel(src, count, trims, first, stride, hist):
    """Pass 1 on one slice: ``hist[t]`` += the bin keys of |θ_t − θ_0| at columns ``first``,
    ``first + stride``, … for the models that trim; returns how many columns were sampled."""
    base = src[0]
    for t in range(src.shape[0] - 1):
        if not trims[t]:
            continue
        row, h = src[1 + t], hist[t]
        for j in range(first, count, stride):
            h[f32_to_bits(abs(widen(row[j]) - widen(base[j]))) >> MAG_SHIFT] += 1
    return (count - first + stride - 1) // stride if first < count else 0


@njit(**JIT)
def ties_bracket_kernel(src, count, lo, nbins, slots, above, coarse, exact):
    """Pass 2 on one slice, per model t with ``nbins[t]`` > 0: ``above[t]`` += #{|θ_t − θ_0|
    in a bin above the bracket's bins lo .. lo + nbins − 1}, ``coarse[t, b − lo]`` += 1 for
    each element in bracket bin b, and, where that bin has an exact slot s = ``slots[t, b −
    lo]`` ≥ 0, ``exact[t, s, p & 0xFFFF]`` += 1 for its float32 pattern p. False on a NaN/Inf
    in any row (the engine then merges the tensor whole). The patterns and a byte per element
    (1: in the bracket) go into chunk buffers in one vectorized loop; then the few flagged
    elements (about 1%) are found eight flags at a time, by the trailing zeros of a 64-bit
    word, rather than by a branch per element (0.039 -> 0.030 s on a 25M-element tensor)."""
    keys = np.empty(CHUNK, np.uint32)
    flags = np.zeros(CHUNK, np.uint8)
    words = flags.view(np.uint64)
    bad = np.uint32(0)
    low_mask = np.uint32((1 << MAG_SHIFT) - 1)
    for c0 in range(0, count, CHUNK):
        n = min(CHUNK, count - c0)
        base = src[0, c0:c0 + n]
        for j in range(n):
            bad |= is_nonfinite(widen(base[j]))
        for t in range(src.shape[0] - 1):
            row = src[1 + t, c0:c0 + n]
            if nbins[t] == 0:
                for j in range(n):
                    bad |= is_nonfinite(widen(row[j]))
                continue
            first, width = np.uint32(lo[t]), np.uint32(nbins[t])
            high = ((first + width) << MAG_SHIFT) - np.uint32(1)
            over = np.uint32(0)
            for j in range(n):
                x = widen(row[j])
                bad |= is_nonfinite(x)
                bits = f32_to_bits(abs(x - widen(base[j])))
                over += np.uint32(bits > high)
                keys[j] = bits
                flags[j] = np.uint8(((bits >> MAG_SHIFT) - first) < width)
            above[t] += over
            rough, slot, fine = coarse[t], slots[t], exact[t]
            for j in range(n, -(-n // 8) * 8):
                flags[j] = 0
            for w in range(-(-n // 8)):
                word = words[w]
                while word:
                    j = 8 * w + (trailing_zeros(word) >> 3)
                    word &= word - np.uint64(1)  # each flag byte holds one bit
                    b = (keys[j] >> MAG_SHIFT) - first
                    rough[b] += 1
                    s = slot[b]
                    if s >= 0:
                        fine[s, keys[j] & low_mask] += 1
    return bad == 0


class _Scratch(threading.local):
    """This thread's reused bracket counts: fresh pages for each tensor would cost a page
    fault per 4 KB."""

    def __init__(self) -> None:
        self.coarse = np.zeros((0, MAX_BINS), np.int64)
        self.exact = np.zeros((0, SLOTS, 1 << MAG_SHIFT), np.int32)

    def counts(self, nbins: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coarse, exact) for ``len(nbins)`` models, zeroed where they will count."""
        models = len(nbins)
        if self.coarse.shape[0] < models:
            self.coarse = np.zeros((models, MAX_BINS), np.int64)
            self.exact = np.zeros((models, SLOTS, 1 << MAG_SHIFT), np.int32)
        coarse, exact = self.coarse[:models], self.exact[:models]
        for t in range(models):
            coarse[t, :nbins[t]] = 0
            exact[t, :int(slots[t].max(initial=-1)) + 1] = 0
        return coarse, exact


_scratch = _Scratch()


class SampledTopK:
    """Per model, the whole tensor's TIES cut-off (k, v, ties at v to keep) from a sample and
    one bracketed counting pass (module docstring); ``plan`` reads as ``SlicedTopK.plan``.

    Passes over the slices in order: :meth:`add_sample`, then :meth:`count`; then
    :meth:`check` tells whether every cut-off was found (else the exact passes must run).
    """

    def __init__(self, densities: Sequence[float]) -> None:
        models = len(densities)
        self.densities = list(densities)
        self.trims = np.asarray([d < 1.0 for d in self.densities])
        self.hist = np.zeros((models, MAG_BINS), np.int64)
        self.numel = 0
        self.sampled = 0
        self.k: list[int | None] = []
        self.lo = np.zeros(models, np.int64)
        self.above = np.zeros(models, np.int64)
        self.nbins = np.zeros(models, np.int64)
        self.slots = np.full((models, MAX_BINS), -1, np.int64)
        self.coarse = np.zeros((models, 0), np.int64)
        self.exact = np.zeros((models, 0, 0), np.int32)
        self.missed = False
        self.thresholds: list[float | None] = []
        self.ties_left: list[int] = []  # counted down by the merge, slice after slice

    def add_sample(self, src: np.ndarray, count: int, slice_start: int) -> None:
        """Pass 1 on the slice of ``count`` columns starting at element ``slice_start``."""
        first = (-slice_start) % STRIDE
        self.sampled += ties_sample_kernel(src, count, self.trims, first, STRIDE, self.hist)
        self.numel += count

    def _brackets(self) -> None:
        """k per model, and the pattern interval [lo, lo + span) that should hold its cut-off
        (span 0: no trim); :attr:`missed` when a bracket would hold too much of the tensor."""
        n, m = self.numel, self.sampled
        for t, density in enumerate(self.densities):
            k = int(density * n) if density < 1.0 else None
            self.k.append(k)
            if k is None or k <= 0:
                continue
            if m < MIN_SAMPLE or n > MAX_NUMEL:
                self.missed = True
                continue
            # descending cumulative counts: desc[b] = sampled keys ≥ b
            desc = np.cumsum(self.hist[t, ::-1])[::-1]
            q = k / n
            spread = Z * math.sqrt(m * q * (1.0 - q)) + 1.0
            top = _bin_at_rank(desc, q * m - spread)
            bottom = _bin_at_rank(desc, q * m + spread)
            if top - bottom + 1 > MAX_BINS:
                self.missed = True
                continue
            self.lo[t], self.nbins[t] = bottom, top - bottom + 1
            # exact slots: the bins whose sample ranks (desc[b + 1], desc[b]] come nearest
            # the expected q·m, sampled ones first at equal distance (bf16 task vectors leave
            # many bins empty)
            bins = np.arange(bottom, top + 1)
            highest = desc[bins]
            lowest = highest - self.hist[t, bins]
            distance = np.maximum(np.maximum(lowest - q * m, q * m - highest), 0.0)
            order = np.lexsort((self.hist[t, bins] == 0, distance))
            for slot, b in enumerate(bins[order[:SLOTS]]):
                self.slots[t, b - bottom] = slot

    def count(self, src: np.ndarray, count: int) -> bool:
        """Pass 2 on one slice; False on a NaN/Inf input."""
        if not self.k:
            self._brackets()
            if self.missed:
                self.nbins[:] = 0
            self.coarse, self.exact = _scratch.counts(self.nbins, self.slots)
        return bool(ties_bracket_kernel(src, count, self.lo, self.nbins, self.slots,
                                        self.above, self.coarse, self.exact))

    def _settle(self) -> None:
        """The cut-off of every model from its bracket counts, or :attr:`missed`."""
        for t, k in enumerate(self.k):
            self.thresholds.append(None)
            self.ties_left.append(0)
            if k is None or k <= 0:
                continue
            # the bin where the running count from the top reaches k, then its pattern
            at, before = _reach(self.coarse[t, :self.nbins[t]], int(self.above[t]), k)
            slot = self.slots[t, at] if at >= 0 else -1
            if slot < 0:
                self.missed = True
                return
            low, before = _reach(self.exact[t, slot], before, k)
            pattern = np.asarray(((self.lo[t] + at) << MAG_SHIFT) + low, np.uint32)
            self.thresholds[t] = float(pattern.view(np.float32))
            self.ties_left[t] = k - before

    def check(self) -> bool:
        """After pass 2: whether every cut-off was found in its bracket (else :attr:`missed`:
        the exact passes must run)."""
        if not self.missed and not self.thresholds:
            self._settle()
        return not self.missed

    def plan(self, t: int) -> tuple[int | None, float | None, int]:
        """(k, cut-off v, ties at v still to keep) of model t, as ``SlicedTopK.plan``, once
        :meth:`check` has passed; the caller that trims hands the remaining count back
        (``ties_left``)."""
        return self.k[t], self.thresholds[t], self.ties_left[t]


def _reach(counts: np.ndarray, above: int, k: int) -> tuple[int, int]:
    """(the index i where ``above`` + counts[i:] summed from the top first reaches k, how
    many lie above index i), or (−1, 0) when they never do or ``above`` ≥ k already."""
    reached = above + np.cumsum(counts[::-1], dtype=np.int64)
    at = int(np.searchsorted(reached, k))
    if above >= k or at == reached.size:
        return -1, 0
    return counts.size - 1 - at, int(reached[at - 1]) if at else above


def _bin_at_rank(desc: np.ndarray, rank: float) -> int:
    """The bin key holding descending rank ``rank`` (1-based, clipped to the sample) of the
    sample whose counts of keys ≥ b are ``desc[b]``: the largest b with desc[b] ≥ rank."""
    rank = min(max(rank, 1.0), float(desc[0]))
    return int(np.flatnonzero(desc >= rank)[-1])
