"""Bootstrap confidence intervals for the bench: accuracies and paired differences.

The percentile bootstrap (Efron & Tibshirani 1993, ch. 13): draw ``B`` resamples of the test
examples with replacement, recompute the statistic on each, and report the
``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of the ``B`` values (c = 0.95):

    acc*_b = 1/n Σ_i correct[idx_b[i]],  idx_b ~ Uniform{0..n-1}^n,  CI = quantiles(acc*_1..B)

Pairing: *one* index matrix ``idx`` (B × n) is drawn per example count ``n`` (from a fixed
seed), and every task and every method with ``n`` test examples is resampled with the same
rows. So a difference between two methods is resampled over the same examples (their
shared difficulty cancels: identical predictions give a difference of exactly 0 with zero
width), and a suite mean over tasks that share test inputs (tiny-vision: every task sees
the same digits under its own transform) keeps their correlation. Everything derives from
each record's per-example ``correct`` vector (stored in the record as a string of 0/1), so
results.json alone is enough to recompute any interval. Deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0


def encode_correct(correct: Sequence[bool | int]) -> str:
    """A per-example correctness vector as the compact string records carry ("0110...")."""
    return "".join("1" if c else "0" for c in correct)


def decode_correct(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


@lru_cache(maxsize=8)
def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The ``n_resamples × n`` example indices every statistic over ``n`` examples shares."""
    rng = np.random.default_rng([seed, n])
    idx = rng.integers(0, n, size=(n_resamples, n))
    idx.setflags(write=False)
    return idx


def replicates(correct: np.ndarray | str, n_resamples: int = N_RESAMPLES,
               seed: int = SEED) -> np.ndarray:
    """The bootstrap replicates (length ``n_resamples``) of one task's accuracy."""
    c = decode_correct(correct) if isinstance(correct, str) else np.asarray(correct, bool)
    if c.size == 0:
        raise ValueError("no examples to resample")
    return c[resample_indices(c.size, n_resamples, seed)].mean(axis=1)


def percentile_interval(reps: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(low), float(high)


def accuracy_interval(correct: np.ndarray | str, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The percentile-bootstrap interval of one task's accuracy."""
    return percentile_interval(replicates(correct, n_resamples, seed), confidence)


def statistic_interval(statistic: Callable[[list[np.ndarray]], np.ndarray],
                       groups: Sequence[Sequence[np.ndarray | str]],
                       confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                       seed: int = SEED) -> tuple[float, float, float]:
    """(point estimate, low, high) of ``statistic`` over per-task accuracies, paired.

    ``groups`` holds, per argument of the statistic, the correctness vectors of its tasks;
    ``statistic`` gets, per argument, an array ``(tasks, k)`` of accuracies (k = 1 for the
    point estimate, ``n_resamples`` for the replicates) and returns a length-k array. All
    vectors of one length are resampled with the same indices.
    """
    def accs(vectors: Sequence[np.ndarray | str], boot: bool) -> np.ndarray:
        rows = []
        for v in vectors:
            c = decode_correct(v) if isinstance(v, str) else np.asarray(v, bool)
            rows.append(replicates(c, n_resamples, seed) if boot else np.array([c.mean()]))
        return np.stack(rows)

    point = float(statistic([accs(g, False) for g in groups])[0])
    low, high = percentile_interval(statistic([accs(g, True) for g in groups]), confidence)
    return point, low, high


def mean_interval(vectors: Sequence[np.ndarray | str], **kw: Any) -> tuple[float, float, float]:
    """(mean over tasks of the accuracy, low, high)."""
    return statistic_interval(lambda a: a[0].mean(axis=0), [vectors], **kw)


def difference_interval(a: Sequence[np.ndarray | str], b: Sequence[np.ndarray | str],
                        **kw: Any) -> tuple[float, float, float]:
    """(mean accuracy of ``a`` − that of ``b``, low, high), resampled over the same examples;
    ``a[i]`` and ``b[i]`` are the same task."""
    return statistic_interval(lambda x: x[0].mean(axis=0) - x[1].mean(axis=0), [a, b], **kw)


def normalized(acc: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Mean over tasks (axis 0) of acc / ref: normalised accuracy per replicate. A task whose
    reference is 0 on a replicate counts as 0 there."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(ref > 0, acc / np.where(ref > 0, ref, 1.0), 0.0)
    return r.mean(axis=0)


def ratio_interval(a: Sequence[np.ndarray | str], ref: Sequence[np.ndarray | str],
                   **kw: Any) -> tuple[float, float, float]:
    """(mean over tasks of acc_a / acc_ref, low, high): normalised accuracy, paired."""
    return statistic_interval(lambda x: normalized(x[0], x[1]), [a, ref], **kw)


def significant(low: float, high: float) -> bool:
    """A difference whose interval excludes 0."""
    return low > 0 or high < 0
