"""Exact L1 norms (methods/_l1.py): the exact sum of the |x|, rounded once, whatever the order."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from modelalloy.methods._l1 import abs_sum, add_abs_bins_, bins_to_float, new_bins


def _exact(x: torch.Tensor) -> float:
    """Σ|x| in rational arithmetic, rounded once to float64 (Fraction → float rounds)."""
    return float(sum((Fraction(float(v)) for v in x.abs().reshape(-1).tolist()), Fraction(0)))


def _mixed(n: int, seed: int = 0) -> torch.Tensor:
    """Magnitudes over the whole float32 range: large, tiny, subnormal, ±0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x[::5] *= 1e30
    x[1::7] *= 1e-30
    x[2::11] = 1e-44  # subnormal
    x[3::13] = -0.0
    return x


def test_abs_sum_is_the_exact_sum_rounded_once():
    x = _mixed(3001)
    assert abs_sum(x) == _exact(x)
    # where a float64 running sum rounds: 2^53 + 1 + 1 (left to right: 2^53 twice)
    y = torch.tensor([2.0 ** 53, 1.0, 1.0])
    assert abs_sum(y) == 2.0 ** 53 + 2


def test_slices_in_any_order_add_up_to_the_whole_tensor():
    x = _mixed(5000, seed=1)
    bins = new_bins(1)[0]
    for start in (3000, 0, 1234, 4000):  # any order, uneven slices
        stop = {3000: 4000, 0: 1234, 1234: 3000, 4000: 5000}[start]
        add_abs_bins_(bins, x[start:stop])
    assert bins_to_float(bins) == abs_sum(x) == _exact(x)


def test_high_row_counts_units_of_2_to_the_32():
    bins = new_bins(1)[0]
    bins[1, 127] = 3  # 3·2^32 units of 2^(127 − 150)
    bins[0, 127] = 5
    assert bins_to_float(bins) == (3 * 2 ** 32 + 5) * 2.0 ** -23


def test_bfloat16_is_widened_exactly_and_a_nan_gives_nan():
    x = _mixed(999, seed=2).to(torch.bfloat16)
    assert abs_sum(x) == _exact(x.float())
    assert math.isnan(abs_sum(torch.tensor([1.0, float("nan")])))


def test_float64_keeps_float64_chunk_sums():
    x = torch.randn(1000, dtype=torch.float64)
    assert abs_sum(x) == float(x.abs().sum())
