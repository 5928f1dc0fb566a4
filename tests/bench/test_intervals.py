"""Bootstrap intervals against answers known without the code: the normal approximation of a
Bernoulli mean and of a paired difference of proportions, exact zeros, and scipy's bootstrap."""

import math

import numpy as np
import pytest

from modelalloy.eval.intervals import (
    accuracy_interval,
    decode_correct,
    difference_interval,
    encode_correct,
    mean_interval,
    ratio_interval,
    significant,
)


def _bernoulli(n: int, p: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def test_bernoulli_interval_approaches_the_normal_interval():
    n, p = 4000, 0.8
    c = _bernoulli(n, p, 1)
    phat = c.mean()
    half = 1.96 * math.sqrt(phat * (1 - phat) / n)  # the Wald interval, exact as n grows
    low, high = accuracy_interval(c, n_resamples=4000)
    assert low == pytest.approx(phat - half, abs=0.15 * half)
    assert high == pytest.approx(phat + half, abs=0.15 * half)


def test_identical_predictions_differ_by_exactly_zero():
    c = [_bernoulli(300, 0.7, s) for s in range(3)]
    assert difference_interval(c, c) == (0.0, 0.0, 0.0)
    assert not significant(0.0, 0.0)


def test_constant_accuracy_has_zero_width():
    assert accuracy_interval(np.ones(50, bool)) == (1.0, 1.0)


def test_paired_difference_matches_the_paired_proportions_formula():
    # Two methods that agree except on a few examples: the variance of the paired difference is
    # (p10 + p01 - (p10 - p01)^2) / n, far smaller than two independent intervals would give.
    n = 3000
    rng = np.random.default_rng(2)
    a = rng.random(n) < 0.8
    b = a.copy()
    flip = rng.choice(n, 240, replace=False)
    b[flip] = ~b[flip]
    p10 = float(np.mean(a & ~b))
    p01 = float(np.mean(~a & b))
    d = p10 - p01
    half = 1.96 * math.sqrt((p10 + p01 - d * d) / n)
    point, low, high = difference_interval([a], [b], n_resamples=4000)
    assert point == pytest.approx(d)
    assert low == pytest.approx(d - half, abs=0.15 * half)
    assert high == pytest.approx(d + half, abs=0.15 * half)
    unpaired = 1.96 * math.sqrt(a.mean() * (1 - a.mean()) / n + b.mean() * (1 - b.mean()) / n)
    assert (high - low) / 2 < 0.5 * unpaired


def test_agrees_with_scipy_paired_percentile_bootstrap():
    from scipy.stats import bootstrap

    a = [_bernoulli(400, 0.75, s) for s in (3, 4)]
    b = [_bernoulli(400, 0.7, s) for s in (5, 6)]

    def stat(a0, a1, b0, b1, axis=-1):
        return (a0.mean(axis) + a1.mean(axis)) / 2 - (b0.mean(axis) + b1.mean(axis)) / 2

    ref = bootstrap((*a, *b), stat, paired=True, vectorized=True, method="percentile",
                    n_resamples=4000, rng=np.random.default_rng(0)).confidence_interval
    point, low, high = difference_interval(a, b, n_resamples=4000)
    assert point == pytest.approx(stat(*a, *b))
    assert low == pytest.approx(ref.low, abs=0.006)
    assert high == pytest.approx(ref.high, abs=0.006)


def test_mean_and_ratio_of_tasks():
    a = [np.array([1, 1, 0, 0], bool), np.array([1, 1, 1, 1], bool)]
    point, low, high = mean_interval(a)
    assert point == pytest.approx(0.75) and low <= point <= high
    r, rl, rh = ratio_interval(a, [np.ones(4, bool), np.ones(4, bool)])
    assert r == pytest.approx(0.75) and (rl, rh) == pytest.approx((low, high))


def test_deterministic_and_string_round_trip():
    c = _bernoulli(200, 0.6, 7)
    s = encode_correct(c)
    assert set(s) <= {"0", "1"} and len(s) == 200
    assert np.array_equal(decode_correct(s), c)
    assert accuracy_interval(s) == accuracy_interval(c)
    assert accuracy_interval(c, seed=1) != accuracy_interval(c, seed=2)
