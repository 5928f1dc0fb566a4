"""The fast per-tensor paths agree with straightforward reference implementations."""

from __future__ import annotations

import pytest
import torch

from modelalloy.methods._sparsify import (
    Scratch,
    combine,
    combine_,
    elect_sign,
    magnitude_trim_,
)


def reference_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Exactly k = int(density·n) largest |δ|, ties at the threshold kept in index order."""
    flat = delta.reshape(-1)
    n = flat.numel()
    k = int(density * n)
    if density >= 1.0:
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    mag = flat.abs()
    v = torch.sort(mag).values[n - k]
    if float(v) == 0.0:
        return delta.clone()
    keep = mag > v
    tied = (mag == v).nonzero().squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return (flat * keep).view(delta.shape)


def bf16_task_vector(n: int, seed: int, scale: float = 0.002) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
    expert = (base + torch.randn(n, generator=g) * scale).bfloat16().float()
    return expert - base


CASES = [
    ("bf16", lambda n, s: bf16_task_vector(n, s)),
    ("bf16-coarse", lambda n, s: bf16_task_vector(n, s, 0.0005)),
    ("float32", lambda n, s: torch.randn(n, generator=torch.Generator().manual_seed(s))),
    ("few-values", lambda n, s: torch.randint(-3, 4, (n,), generator=torch.Generator()
                                              .manual_seed(s)).float()),
    ("mostly-zero", lambda n, s: torch.where(torch.arange(n) % 7 == 0, 1.0, 0.0)),
    ("two-values-per-bin", lambda n, s: 1.0 + torch.randint(0, 2, (n,), generator=torch
                                                            .Generator().manual_seed(s))
     .float() * 2.0**-20),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("density", [0.0001, 0.1, 0.2, 0.5, 0.9, 0.999])
def test_magnitude_trim_matches_reference(name, make, density):
    for n, seed in ((4096, 0), (70_001, 1), (200_000, 2)):
        x = make(n, seed)
        want = reference_trim(x, density)
        got = magnitude_trim_(x.clone(), density)
        assert torch.equal(got, want), (name, n, density)
        assert int(got.count_nonzero()) == min(int(density * n), int(x.count_nonzero()))


def test_magnitude_trim_with_shared_scratch_and_2d():
    xs = [bf16_task_vector(300 * 257, s).view(300, 257) for s in range(3)]
    scratch = Scratch(xs[0])
    for x in xs:
        want = reference_trim(x, 0.2)
        assert torch.equal(magnitude_trim_(x.clone(), 0.2, scratch), want)


def reference_combine(deltas, weights, sign, normalize):
    out = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        agree = (d * sign > 0).float()
        out += w * d * agree
        den += w * agree
    if normalize:
        den[den <= 0] = 1.0
        out = out / den
    return out


@pytest.mark.parametrize("vote", ["paper", "weighted"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 0.0, 2.0], [0.0, 0.0, 0.0]])
def test_combine_in_place_matches_reference(vote, normalize, weights):
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randint(-2, 3, (5000,), generator=g).float() * 0.5 for _ in range(3)]
    sign = elect_sign(deltas, weights, vote)
    want = reference_combine(deltas, weights, sign, normalize)
    assert torch.allclose(combine(deltas, weights, sign=sign, normalize=normalize), want)
    copies = [d.clone() for d in deltas]
    sign2 = elect_sign(copies, weights, vote, out=torch.empty(5000))
    assert torch.equal(sign, sign2)
    got = combine_(copies, weights, sign=sign2, normalize=normalize, scratch=Scratch(sign))
    assert torch.allclose(got, want)


@pytest.mark.parametrize("majority", [None, 1.0, -1.0, 0.0])
def test_elect_sign_fills_zero_sums(majority):
    d1 = torch.tensor([1.0, -1.0, 2.0, 0.0, -3.0])
    d2 = torch.tensor([-1.0, 1.0, 1.0, 0.0, 1.0])
    total = d1 + d2
    sign = torch.sign(total)
    m = float(torch.sign(sign.sum())) if majority is None else majority
    want = torch.where(sign == 0, m, sign)
    assert torch.equal(elect_sign([d1, d2], [1.0, 1.0], "paper", majority), want)
    want_w = torch.where(total >= 0, 1.0, -1.0)
    assert torch.equal(elect_sign([d1, d2], [1.0, 1.0], "weighted"), want_w)


@pytest.mark.parametrize("rescale_norm", ["density", "l1"])
def test_dare_keeps_entries_whose_stream_word_is_below_the_density_threshold(rescale_norm):
    import hashlib

    import numpy as np

    from modelalloy.methods import MergeContext
    from modelalloy.methods._sparsify import dare_

    x = torch.randn(64, 131)
    ctx = MergeContext(name="w", seed=7)
    # The documented stream: SFC64 seeded from sha256(seed, name, model index), 32-bit words.
    seed = int.from_bytes(hashlib.sha256(b"7\x00w\x002").digest()[:8], "little") & (2**63 - 1)
    words = np.random.Generator(np.random.SFC64(seed)).integers(
        0, 2**64 - 1, size=(x.numel() + 1) // 2, dtype=np.uint64, endpoint=True)
    words = words.view(np.uint32)[: x.numel()].astype(np.int64)
    keep = torch.from_numpy(words < round(0.3 * 2**32))
    want = x * keep.view(x.shape)
    want = want / 0.3 if rescale_norm == "density" else want * (x.abs().sum() / want.abs().sum())
    got = dare_(x.clone(), 0.3, ctx, 2, rescale_norm=rescale_norm)
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    assert torch.equal(got, dare_(x.clone(), 0.3, ctx, 2, rescale_norm=rescale_norm))


def test_keep_mask_rate_and_streaming():
    from modelalloy.methods import MergeContext

    n = 200_001
    mask = MergeContext(name="a", seed=1).keep_mask(torch.empty(n), 0.2, 0)
    # Kept with probability 0.2: 5 standard deviations of a binomial(n, 0.2).
    assert abs(mask.float().mean().item() - 0.2) < 5 * (0.8 * 0.2 / n) ** 0.5
    assert not torch.equal(mask, MergeContext(name="a", seed=1).keep_mask(torch.empty(n), 0.2, 1))
    # A streaming context continues the stream: slices (even sizes, then the rest) draw the
    # whole tensor's mask.
    streaming = MergeContext(name="a", seed=1, streams={})
    parts = [streaming.keep_mask(torch.empty(k), 0.2, 0) for k in (65_536, 100_000, 34_465)]
    assert torch.equal(torch.cat(parts), mask)


def test_weighted_sum_matches_formula():
    from modelalloy.methods._sparsify import weighted_sum

    g = torch.Generator().manual_seed(5)
    base = torch.randn(1000, generator=g)
    experts = [base + torch.randn(1000, generator=g) * 1e-3 for _ in range(3)]
    for weights in ([1.0, 1.0, 1.0], [0.0, 2.0, -0.5], [0.0, 0.0, 0.0]):
        want = sum(w * (e - base) for w, e in zip(weights, experts, strict=True))
        assert torch.allclose(weighted_sum(base, experts, weights), want, atol=1e-7)
        want = sum(w * e for w, e in zip(weights, experts, strict=True))
        assert torch.allclose(weighted_sum(None, experts, weights), want)


def test_float64_inputs_take_the_generic_paths():
    from modelalloy.methods._sparsify import band_trim_, magprune_probabilities

    x = bf16_task_vector(50 * 200, 9).view(50, 200)
    assert torch.equal(magnitude_trim_(x.double(), 0.2).float(), reference_trim(x, 0.2))
    assert torch.equal(band_trim_(x.double(), 0.2, 0.01).float(), band_trim_(x.clone(), 0.2, 0.01))
    assert torch.allclose(magprune_probabilities(x.double(), 0.5, 0.1).float(),
                          magprune_probabilities(x, 0.5, 0.1))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.0, 1.0, 1e-6])
@pytest.mark.parametrize("slice_size", [4096, 7777])
def test_sliced_top_k_keeps_the_entries_magnitude_trim_keeps(density, slice_size):
    """Three passes over slices (histogram, the threshold's bin, trim with a running tie
    count) keep what magnitude_trim_ keeps on the whole tensor: exactly int(density·n)
    entries, ties at the threshold in index order."""
    from modelalloy.methods._sparsify import magnitude_trim_
    from modelalloy.methods.orderstats import SlicedTopK

    gen = torch.Generator().manual_seed(8)
    n = 50_001
    # few distinct magnitudes, many zeros: the threshold is tied many times over
    deltas = [torch.randint(-5, 6, (n,), generator=gen).float() * 0.125 for _ in range(2)]
    deltas[1][: n // 2] *= 1e-3  # a second scale, so the histogram's bins differ
    trim = SlicedTopK([density, density])
    slices = [(s, min(s + slice_size, n)) for s in range(0, n, slice_size)]
    for t, d in enumerate(deltas):
        for a, b in slices:
            trim.count(t, d[a:b])
    for t, d in enumerate(deltas):
        for a, b in slices:
            trim.collect(t, d[a:b])
    for t, d in enumerate(deltas):
        got = torch.cat([trim.trim_(t, d[a:b].clone()) for a, b in slices])
        want = magnitude_trim_(d.clone(), density)
        assert torch.equal(got, want)
        if 0 < density < 1 and int(density * n) <= int((d != 0).sum()):
            assert int((got != 0).sum()) == int(density * n)
