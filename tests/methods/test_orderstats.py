"""methods/orderstats.py against order statistics worked out independently: numpy's partition
and stable argsort, torch.kthvalue, on random inputs with many ties at the cut-off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelalloy.methods._sparsify import band_trim_
from modelalloy.methods.orderstats import (
    RankSelect,
    SlicedBand,
    SlicedTopK,
    band_edges,
    kth_largest,
    kth_smallest,
    order_stats,
    tie_window,
)


def _tied(n: int, seed: int, levels: int | None = None) -> torch.Tensor:
    """Random float32 values; with ``levels``, only that many distinct magnitudes (ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if levels is not None:
        x = torch.randint(-levels, levels + 1, (n,), generator=g).float() * 0.125
    return x


def test_rank_select_orders_many_patterns_inside_one_bin_and_holds_no_values():
    """Pass 2 keeps a histogram of the low bits, not the values: values sharing a key (1 +
    k·2^-23, k < 2^16, and repeats of them) are ordered and counted as a sort does."""
    g = torch.Generator().manual_seed(4)
    steps = torch.randint(0, 1 << 16, (20_000,), generator=g)
    x = 1.0 + steps.double() * 2.0 ** -23
    x = torch.cat([x.float(), torch.rand(5000, generator=g)])  # and values in other bins
    select = RankSelect(1)
    for start in range(0, x.numel(), 4096):
        select.add_numel(min(4096, x.numel() - start))
        select.count(0, x[start:start + 4096])
    ranks = [5001, 12_345, 25_000]
    select.request(0, ranks)
    for start in range(0, x.numel(), 4096):
        select.collect(0, x[start:start + 4096])
    assert all(h is None or h.numel() == 1 << 16 for h in select.values[0].values())
    ordered = np.sort(x.numpy())
    for rank, cut in zip(ranks, select.cuts(0), strict=True):
        v = ordered[rank - 1]
        assert cut.value == v
        assert cut.above == int((x.numpy() > v).sum())
        assert cut.tied == int((x.numpy() == v).sum())


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, x.numel(), size)]


@pytest.mark.parametrize("levels", [None, 7])
@pytest.mark.parametrize("n", [100, 9000])
def test_kth_largest_and_smallest_match_numpy_partition(n, levels):
    mag = _tied(n, 1, levels).abs()
    ref = np.sort(mag.numpy())
    for k in (1, 2, n // 3, n - 1, n):
        assert float(kth_largest(mag, k)) == ref[n - k]
        assert float(kth_smallest(mag, k)) == float(torch.kthvalue(mag, k).values)
        assert float(kth_smallest(mag, k)) == np.partition(mag.numpy(), k - 1)[k - 1]


@pytest.mark.parametrize("levels", [None, 5])
def test_rank_select_over_chunks_gives_the_values_counts_above_and_ties(levels):
    rows = [_tied(10_000, 2, levels).abs(), _tied(10_000, 3, levels).abs()]
    select = RankSelect(2)
    for start in range(0, 10_000, 3001):
        select.add_numel(min(3001, 10_000 - start))
        for r, x in enumerate(rows):
            select.count(r, x[start:start + 3001])
    ranks = [[1, 5000, 10_000], [777, 9999]]
    for r in range(2):
        select.request(r, ranks[r])
    for start in range(0, 10_000, 3001):
        for r, x in enumerate(rows):
            select.collect(r, x[start:start + 3001])
    for r, x in enumerate(rows):
        ordered = np.sort(x.numpy())
        for rank, cut in zip(ranks[r], select.cuts(r), strict=True):
            v = ordered[rank - 1]
            assert cut.value == v
            assert cut.above == int((x.numpy() > v).sum())
            assert cut.tied == int((x.numpy() == v).sum())


def _top_k_reference(x: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest |x|, equal magnitudes by index (lower first): a stable sort."""
    order = np.argsort(-np.abs(x), kind="stable")
    keep = np.zeros(x.size, bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("slice_size", [1000, 4096, 20_000])
@pytest.mark.parametrize("levels", [None, 4])
def test_sliced_top_k_keeps_the_k_largest_with_ties_in_index_order(slice_size, levels):
    xs = [_tied(20_000, 5, levels), _tied(20_000, 6, levels)]
    densities = [0.3, 0.05]
    trim = SlicedTopK(densities)
    for step in (trim.count, trim.collect):
        for t, x in enumerate(xs):
            for part in _chunks(x, slice_size):
                step(t, part)
    for t, x in enumerate(xs):
        got = torch.cat([trim.trim_(t, part.clone()) for part in _chunks(x, slice_size)])
        keep = _top_k_reference(x.numpy(), int(densities[t] * x.numel()))
        want = x.numpy() * keep
        assert np.array_equal(got.numpy(), want)
        assert int((got != 0).sum()) == int((want != 0).sum())


def _band_reference(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit's magnitude_outliers mask: stable ascending argsort of |x|, keep ascending
    positions n − hi .. n − n_top − 1 (the band below the top outliers)."""
    n = x.size
    edges = band_edges(n, density, gamma)
    if edges is None:
        return np.ones(n, bool)
    top, hi = edges
    order = np.argsort(np.abs(x), kind="stable")
    keep = np.zeros(n, bool)
    keep[order[n - hi:n - top]] = True
    return keep


@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.5, 0.3), (0.0, 0.1), (0.9, 0.5),
                                           (0.3, 0.0), (1.0, 0.1)])
@pytest.mark.parametrize("levels", [None, 3])
def test_sliced_band_is_mergekits_stable_sort_band_and_the_whole_tensor_band(density, gamma,
                                                                             levels):
    n, step = 12_345, 2_000
    x = _tied(n, 8, levels)
    band = SlicedBand([density], [gamma])
    for part in _chunks(x, step):
        band.count(0, part)
    for part in _chunks(x, step):
        band.collect(0, part)
    got = torch.cat([band.trim_(0, part.clone()) for part in _chunks(x, step)])
    want = x.numpy() * _band_reference(x.numpy(), density, gamma)
    assert np.array_equal(got.numpy(), want)
    whole = band_trim_(x.clone().view(15, 823), density, gamma, "tensor").reshape(-1)
    assert torch.equal(got, whole)  # bits: −0.0 where a negative entry was dropped, as whole


def test_tie_window_counts_from_the_highest_index():
    # values 5, 3, 3, 3, 1 at ascending index order of the ties [3, 3, 3]: above = 1 (the 5)
    # descending ranks 2..4 are the ties; the tie at index j has rank 1 + 3 − j
    assert tie_window(above=1, tied=3, top=2, hi=3) == (1, 2)  # rank 3 only: j = 1
    assert tie_window(above=1, tied=3, top=0, hi=4) == (0, 4)  # every tie


def test_order_stats_of_signed_values_match_numpy():
    rows = [_tied(7000, 9), _tied(5000, 10, 6)]
    chunks = [[r[i:i + 1500] for r in rows] for i in range(0, 7000, 1500)]
    values, maxima = order_stats(lambda: iter(chunks), 2, lambda r, d: [0, d // 2, d - 1])
    for r, x in enumerate(rows):
        ordered = np.sort(x.numpy())
        d = x.numel()
        assert values[r] == [ordered[0], ordered[d // 2], ordered[d - 1]]
        assert maxima[r] == ordered[-1]
