"""DELLA: MagPrune keep probabilities, unbiased mean, exact 1/π rescale, the merges."""

import pytest
import torch

from modelalloy.errors import MethodError
from modelalloy.methods._sparsify import magprune_, magprune_probabilities
from modelalloy.methods.registry import MergeContext


def test_keep_probabilities_follow_the_rank():
    d = torch.tensor([[0.1, -0.5, 0.3, 0.2], [4.0, 3.0, 2.0, 1.0]])
    # ranks ascending by |δ|: [0, 3, 2, 1] and [3, 2, 1, 0]; π = 0.4 + 0.2·r/3
    p = magprune_probabilities(d, 0.5, 0.1)
    want = torch.tensor([[0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3],
                         [0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3, 0.4]])
    assert torch.allclose(p, want)
    # a row of one entry: π = density
    assert torch.allclose(magprune_probabilities(torch.tensor([[2.0], [3.0]]), 0.7, 0.1),
                          torch.tensor([[0.7], [0.7]]))


def test_kept_entries_are_divided_by_their_probability():
    d = torch.tensor([0.1, -0.5, 0.3, 0.2, 1.0, -2.0])
    p = magprune_probabilities(d, 0.5, 0.2)
    out = magprune_(d.clone(), 0.5, 0.2, MergeContext(name="w", seed=4), 0)
    kept = out != 0
    assert torch.allclose(out[kept], d[kept] / p[kept])


def test_mean_over_seeds_is_the_delta():
    d = torch.tensor([0.1, -0.5, 0.3, 0.2, 1.0, -2.0])
    n = 3000
    total = torch.zeros_like(d)
    for seed in range(n):
        total += magprune_(d.clone(), 0.5, 0.2, MergeContext(name="w", seed=seed), 0)
    # variance δ²(1/π − 1) ≤ δ²·2.33 at π = 0.3: sd of the mean ≤ 0.028|δ|
    assert torch.allclose(total / n, d, rtol=0.15, atol=0.0)


def test_keep_rate_per_rank():
    # 2000 rows of 5: the smallest entry kept at 0.3, the largest at 0.7
    x = torch.arange(1.0, 6.0).repeat(2000, 1)
    out = magprune_(x.clone(), 0.5, 0.2, MergeContext(name="w", seed=0), 0, rescale=False)
    rate = (out != 0).float().mean(dim=0)
    assert torch.allclose(rate, torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]), atol=0.04)


def test_epsilon_must_keep_probabilities_inside_zero_one(run):
    with pytest.raises(MethodError, match="epsilon"):
        run("della", [0.0, 0.0], [[1.0, 2.0]], density=0.1, epsilon=0.15)


def test_della_without_drop_is_weighted_ties(run):
    base = torch.zeros(3)
    experts = [torch.tensor([1.0, -2.0, 2.0]), torch.tensor([-3.0, -2.0, -2.0])]
    # weighted vote w = [3, 1]: [3-3, -6-2, 6-2] = [0 -> '+', '-', '+']
    # normalize: weighted means of the agreeing: [1, -2, 2]; lambda 1.5
    out = run("della", base, experts, weight=[3.0, 1.0], **{"lambda": 1.5})
    assert torch.allclose(out, 1.5 * torch.tensor([1.0, -2.0, 2.0]))
    lin = run("della_linear", base, experts, weight=[3.0, 1.0])
    assert torch.allclose(lin, 3 * experts[0] + experts[1])


def test_della_is_seeded(run):
    base = torch.zeros(50)
    experts = [torch.linspace(-1, 1, 50), torch.linspace(1, -1, 50) ** 3]
    a = run("della", base, experts, density=0.5, epsilon=0.1, seed=1)
    b = run("della", base, experts, density=0.5, epsilon=0.1, seed=1)
    c = run("della", base, experts, density=0.5, epsilon=0.1, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
