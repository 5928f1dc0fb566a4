"""DARE: identity at p = 0, unbiased in expectation, exact rescale, seeded per (seed, name)."""

import torch

from modelalloy.methods._sparsify import dare_
from modelalloy.methods.registry import MergeContext

DELTA = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5, -2.0, 0.125])


def test_p_zero_is_the_identity(run):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    expert = torch.randn(5, 6, generator=g)
    out = run("dare_linear", base, [expert], density=1.0)
    assert torch.allclose(out, expert, atol=1e-6)
    d = DELTA.clone()
    assert torch.equal(dare_(d, 1.0, MergeContext(name="w"), 0), DELTA)


def test_p_one_gives_the_base(run):
    out = run("dare_linear", [1.0, 2.0], [[3.0, 5.0]], density=0.0)
    assert out.tolist() == [1.0, 2.0]


def test_survivors_are_rescaled_by_one_over_one_minus_p():
    d = dare_(DELTA.clone(), 0.25, MergeContext(name="w", seed=3), 0)
    kept = d != 0
    assert torch.allclose(d[kept], DELTA[kept] / 0.25)


def test_expectation_is_the_delta():
    total = torch.zeros_like(DELTA)
    n = 3000
    for seed in range(n):
        total += dare_(DELTA.clone(), 0.5, MergeContext(name="w", seed=seed), 0)
    # per entry: variance δ²(1/density − 1) = δ², so the mean's sd is |δ|/√3000 ≈ 0.018|δ|
    assert torch.allclose(total / n, DELTA, rtol=0.1, atol=0.0)


def test_kept_fraction_is_the_density():
    d = dare_(torch.ones(20000), 0.3, MergeContext(name="big", seed=0), 0)
    assert abs(float((d != 0).float().mean()) - 0.3) < 0.015


def test_reproducible_for_seed_and_name_and_different_otherwise():
    def mask(seed, name, index=0):
        return dare_(torch.ones(256), 0.5, MergeContext(name=name, seed=seed), index) != 0

    assert torch.equal(mask(1, "a.weight"), mask(1, "a.weight"))
    assert not torch.equal(mask(1, "a.weight"), mask(1, "b.weight"))
    assert not torch.equal(mask(1, "a.weight"), mask(2, "a.weight"))
    assert not torch.equal(mask(1, "a.weight", 0), mask(1, "a.weight", 1))


def test_l1_rescale_matches_the_original_l1_norm():
    d = dare_(DELTA.clone(), 0.5, MergeContext(name="w", seed=5), 0, rescale_norm="l1")
    assert abs(float(d.abs().sum()) - float(DELTA.abs().sum())) < 1e-5
    kept = d != 0
    ratio = d[kept] / DELTA[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_no_rescale_keeps_the_raw_values():
    d = dare_(DELTA.clone(), 0.5, MergeContext(name="w", seed=5), 0, rescale=False)
    kept = d != 0
    assert torch.equal(d[kept], DELTA[kept])


def test_dare_linear_uses_each_models_own_mask(run):
    base = torch.zeros(64)
    experts = [torch.ones(64), 2 * torch.ones(64)]
    out = run("dare_linear", base, experts, density=0.5, seed=11, name="n")
    m1 = dare_(torch.ones(64), 0.5, MergeContext(name="n", seed=11), 0)
    m2 = dare_(2 * torch.ones(64), 0.5, MergeContext(name="n", seed=11), 1)
    assert torch.allclose(out, m1 + m2)


def test_dare_ties_is_ties_on_the_dropped_deltas(run):
    base = torch.zeros(4)
    experts = [torch.tensor([3.0, -2.0, 1.0, 0.0]), torch.tensor([-1.0, -2.0, 1.0, 4.0])]
    # density 1: no drop. Signs [+, -, +, +]; normalize false (mergekit default): sums
    out = run("dare_ties", base, experts)
    assert out.tolist() == [3.0, -4.0, 2.0, 4.0]
    out = run("dare_ties", base, experts, normalize=True)
    assert out.tolist() == [3.0, -2.0, 1.0, 4.0]
