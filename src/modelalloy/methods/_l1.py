"""Exact L1 norms that stream: ‖x‖₁ of float32 values, summed without rounding, rounded once.

A float32 |x| is m·2^(max(e, 1) − 150) with e its 8-bit exponent field and m its 24-bit
mantissa (the implicit leading 1 included when e > 0). Adding the m of each exponent into an
int64 bin (``L1_BINS`` of them) sums the values exactly; a second row of bins counts in units
of 2^32 of the first (the fused kernel adds whole chunks' sums, up to 2^52 units, split in
two), so a bin takes 2^31 additions before it could overflow. :func:`bins_to_float` then rounds
Σ_e (bins[0, e] + 2^32·bins[1, e])·2^(max(e, 1) − 150) to the nearest float64 once.

So the sum depends on no order: a tensor's slices, added in any order, on any thread count,
in torch (:func:`add_abs_bins_`) or in the fused kernels (``kernels.elementwise.dare_l1_kernel``),
give the whole tensor's sum bit for bit, and the torch path and the kernels need not repeat
each other's float64 additions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modelalloy.methods.registry import SLICE_ELEMENTS
from modelalloy.threads import one_intra_op_thread

L1_BINS = 256  # one per float32 exponent field; 255 (Inf/NaN) makes the norm NaN
_MANTISSA = 0x7FFFFF


def new_bins(models: int = 1) -> np.ndarray:
    """Zeroed int64 bins, (models × 2 × L1_BINS)."""
    return np.zeros((models, 2, L1_BINS), np.int64)


def add_abs_bins_(bins: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """Add |x|'s mantissas to ``bins`` (one model's, 2 × L1_BINS) by exponent. ``x`` is float32 or a
    narrower float (widened exactly); float64 is refused (its mantissas overflow the bins)."""
    if x.dtype == torch.float64:
        raise TypeError("exact L1 bins take float32 or narrower values, not float64")
    flat = x.reshape(-1)
    counts = torch.from_numpy(bins[0])
    for start in range(0, flat.numel(), SLICE_ELEMENTS):
        # bounded temporaries; per chunk each bin's float64 count stays below 2^42: exact
        part = flat[start:start + SLICE_ELEMENTS].float().contiguous().view(torch.int32)
        magnitude = part & 0x7FFFFFFF
        exponent = magnitude >> 23
        mantissa = (magnitude & _MANTISSA) | ((exponent > 0).int() << 23)
        counts += torch.bincount(exponent, weights=mantissa.double(),
                                 minlength=L1_BINS).long().cpu()  # on x's device
    return bins


def bins_to_float(bins: np.ndarray) -> float:
    """One model's Σ_e (bins[0, e] + 2^32·bins[1, e])·2^(max(e, 1) − 150) rounded once to
    float64 (NaN if an Inf/NaN was added)."""
    if bins[0, L1_BINS - 1] or bins[1, L1_BINS - 1]:
        return math.nan
    # the sum scaled by 2^149 is an integer; int / int rounds correctly
    low, high = bins.tolist()
    total = sum((lo + (hi << 32)) << (max(e, 1) - 1)
                for e, (lo, hi) in enumerate(zip(low, high, strict=True)) if lo or hi)
    return total / (1 << 149)


def abs_sum(x: torch.Tensor) -> float:
    """‖x‖₁ of a float32 (or narrower) tensor, exact then rounded once to float64 (the same
    number for the whole tensor and for its slices' bins added up). A float64 tensor (only
    ever given by a direct caller: the engine merges in float32) gets float64 sums over
    ``SLICE_ELEMENTS`` chunks, added in order on one intra-op thread."""
    if x.dtype != torch.float64:
        return bins_to_float(add_abs_bins_(new_bins(1)[0], x))
    flat, total = x.reshape(-1), 0.0
    with one_intra_op_thread():
        for start in range(0, flat.numel(), SLICE_ELEMENTS):
            total += float(flat[start:start + SLICE_ELEMENTS].abs().sum())
    return total
