"""inspect's per-tensor sums, by both paths (numba's fused passes and torch ops), against the
definitions worked out here with numpy: chunked, with ties at the trim thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modelalloy.inspection.metrics as metrics

DENS = [0.3, 0.5, 0.1]
WEIGHTS = [1.0, 0.5, 2.0]


@pytest.fixture(params=["torch", "fused"])
def path(request, monkeypatch):
    if request.param == "fused":
        pytest.importorskip("numba")
        monkeypatch.setenv("MODELALLOY_KERNELS", "1")
    else:
        monkeypatch.setenv("MODELALLOY_KERNELS", "0")
    monkeypatch.setattr(metrics, "CHUNK", 1000)  # several chunks, an odd last one
    return request.param


def _taus(n: int = 3) -> list[torch.Tensor]:
    """Quarter steps (many ties at every threshold), exact zeros, one all-zero expert row."""
    g = torch.Generator().manual_seed(0)
    taus = [(torch.randn(50, 101, generator=g) * 4).round() / 4 for _ in range(n)]
    taus[1][:5] = 0.0
    return taus


def _reference(taus: list[torch.Tensor], dens: list[float], method: str, vote: str) -> dict:
    t = np.stack([x.double().numpy().ravel() for x in taus])
    n, size = t.shape
    masks = np.zeros_like(t, dtype=bool)
    for i in range(n):
        k = int(dens[i] * size)
        # k largest |τ|, equal ones in index order (lexsort: last key first)
        order = np.lexsort((np.arange(size), -np.abs(t[i])))
        masks[i, order[:k]] = True
        masks[i] &= t[i] != 0  # trim_ never keeps a zero (it multiplies)
    mtl = t.sum(0)
    tall = np.abs(t) > 0.5 * np.abs(mtl - t)  # λ = 0.5: exact in float32
    voters = np.where(masks, t, 0.0) if method == "ties" else t
    coeff = np.asarray(WEIGHTS)[:, None] if vote == "weighted" else np.ones((n, 1))
    gamma = np.where((voters * coeff).sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(voters) == gamma
    kept = (t ** 2 * agree).sum(1)
    sq = (t ** 2).sum(1)
    if method == "dare_ties":
        kept = kept * np.asarray(dens)
    elif method not in ("ties",):
        kept = sq
    return {
        "dot": t @ t.T,
        "conflicts": int(((t > 0).any(0) & (t < 0).any(0)).sum()),
        "ties_and": masks.astype(int) @ masks.astype(int).T,
        "ties_or": np.array([[(masks[i] | masks[j]).sum() for j in range(n)]
                             for i in range(n)]),
        "tall_and": tall.astype(int) @ tall.astype(int).T,
        "tall_or": np.array([[(tall[i] | tall[j]).sum() for j in range(n)] for i in range(n)]),
        "kept_sq": kept,
    }


@pytest.mark.parametrize(("method", "vote"), [("ties", "paper"), ("ties", "weighted"),
                                              ("dare_ties", "paper"), ("linear", "paper")])
def test_sums_match_definitions(path, method, vote):
    taus = _taus()
    got = metrics.tensor_sums(taus, weights=WEIGHTS, densities=DENS, mask_lambda=0.5,
                              method=method, vote=vote)
    want = _reference(taus, DENS, method, vote)
    assert got.numel == taus[0].numel()
    assert np.allclose(got.dot, want["dot"], rtol=1e-6)
    assert got.conflicts == want["conflicts"]
    for key in ("ties_and", "ties_or", "tall_and", "tall_or"):
        assert np.array_equal(np.asarray(getattr(got, key)), want[key]), key
    assert np.allclose(got.kept_sq, want["kept_sq"], rtol=1e-6)


def test_many_experts_count_pairs_directly(path, monkeypatch):
    """Above MAX_CODED experts the pair counts are taken directly: the same numbers."""
    monkeypatch.setattr(metrics, "MAX_CODED", 2)
    taus = _taus()
    got = metrics.tensor_sums(taus, weights=WEIGHTS, densities=DENS, mask_lambda=0.5,
                              method="ties")
    want = _reference(taus, DENS, "ties", "paper")
    for key in ("ties_and", "ties_or", "tall_and", "tall_or"):
        assert np.array_equal(np.asarray(getattr(got, key)), want[key]), key


def test_density_one_and_zero(path):
    """density 1 keeps every non-zero entry (no trim pass); a density whose k is 0 keeps
    nothing."""
    taus = _taus()
    got = metrics.tensor_sums(taus, weights=WEIGHTS, densities=[1.0, 1e-9, 1.0],
                              mask_lambda=0.5, method="ties")
    nonzero = [int((t != 0).sum()) for t in taus]
    assert got.ties_and[0][0] == nonzero[0] and got.ties_and[2][2] == nonzero[2]
    assert got.ties_and[1][1] == 0 and got.kept_sq[1] == 0.0
