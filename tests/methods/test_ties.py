"""TIES-Merging: trim, sign election and disjoint mean against hand-computed numbers, and the
whole-model (global) scope against a naive concatenate-everything reference."""

import pytest
import torch

from modelalloy.api import merge_state_dicts
from modelalloy.methods import get_method
from modelalloy.methods._sparsify import global_thresholds, magnitude_trim_
from modelalloy.methods.registry import MergeContext, TensorGroup


def test_vote_plus3_minus1_minus1_gives_3(run):
    # Σ = +1 > 0, so only the positive entry is kept: the disjoint mean is 3.
    out = run("ties", [0.0], [[3.0], [-1.0], [-1.0]])
    assert out.tolist() == [3.0]


def test_election_and_disjoint_mean_per_coordinate(run):
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    taus = [[3.0, -2.0, 0.0, 1.0], [-1.0, -2.0, 5.0, 1.0], [-1.0, 1.0, 0.0, -1.0]]
    # sums [1, -3, 5, 1] -> signs [+, -, +, +]; agreeing means [3, -2, 5, 1]
    out = run("ties", base, [base + torch.tensor(t) for t in taus])
    assert torch.allclose(out, base + torch.tensor([3.0, -2.0, 5.0, 1.0]))
    # normalize false: sum of the agreeing entries [3, -4, 5, 2], lambda 0.5
    out = run("ties", base, [base + torch.tensor(t) for t in taus], normalize=False,
              **{"lambda": 0.5})
    assert torch.allclose(out, base + 0.5 * torch.tensor([3.0, -4.0, 5.0, 2.0]))


def test_single_task_density_one_lambda_one_returns_it(run):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g)
    expert = torch.randn(3, 4, generator=g)
    assert torch.allclose(run("ties", base, [expert]), expert, atol=1e-6)
    assert torch.allclose(run("ties", base, [expert], scope="global",
                              global_stats={"thresholds": [None], "majority": 1.0}),
                          expert, atol=1e-6)


def test_trim_keeps_the_largest_magnitudes(run):
    # density 0.5 of 4 entries: keep k = 2 largest |τ|: -4 and 3
    out = run("ties", [0.0] * 4, [[0.1, -4.0, 3.0, 0.2]], density=0.5)
    assert out.tolist() == [0.0, -4.0, 3.0, 0.0]


def test_trim_exact_k_with_ties_in_index_order():
    d = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5])
    magnitude_trim_(d, 0.4)  # k = 2 of 5; four entries tie at |1|: the first two stay
    assert d.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    z = torch.tensor([0.0, 2.0, 0.0, 0.0])
    magnitude_trim_(z, 0.5)
    assert z.tolist() == [0.0, 2.0, 0.0, 0.0]


def test_zero_sum_takes_the_majority_sign_paper_vote(run):
    # coordinate 0 sums to 0; the other coordinates elect '-', so the majority is '-'
    experts = [[2.0, -1.0, -1.0], [-2.0, -1.0, -1.0]]
    assert run("ties", [0.0] * 3, experts).tolist() == [-2.0, -1.0, -1.0]
    # mergekit's weighted vote sends a zero sum to '+'
    assert run("ties", [0.0] * 3, experts, vote="weighted").tolist() == [2.0, -1.0, -1.0]


def test_weights_enter_the_vote_only_with_weighted(run):
    # paper: sign(1 + -3) = '-' -> only model 2 agrees: weighted mean = -3
    assert run("ties", [0.0], [[1.0], [-3.0]], weight=[5.0, 1.0]).tolist() == [-3.0]
    # weighted: 5*1 + 1*(-3) = 2 > 0 -> only model 1 agrees: 5*1/5 = 1
    assert run("ties", [0.0], [[1.0], [-3.0]], weight=[5.0, 1.0],
               vote="weighted").tolist() == [1.0]


def test_weighted_disjoint_mean(run):
    # both agree: (2*1 + 1*4) / 3 = 2
    assert run("ties", [0.0], [[1.0], [4.0]], weight=[2.0, 1.0]).tolist() == [2.0]


# ------------------------------------------------------------------------------------------
# Global scope


def _naive_global_ties(base_sd, expert_sds, density, lam=1.0):
    """The official code's recipe: flatten every model (sorted keys), top-k, elect, dis-mean."""
    keys = sorted(base_sd)
    flat_base = torch.cat([base_sd[k].reshape(-1) for k in keys])
    rows = torch.stack([torch.cat([sd[k].reshape(-1) for k in keys]) - flat_base
                        for sd in expert_sds])
    d = rows.shape[1]
    m = d - int(density * d)
    kept = []
    for row in rows:
        v = torch.kthvalue(row.abs(), m).values
        kept.append(row * (row.abs() >= v))
    kept = torch.stack(kept)
    sign = torch.sign(kept.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    agree = ((kept > 0) & (sign > 0)) | ((kept < 0) & (sign < 0))
    merged = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
    flat = flat_base + lam * merged
    out, i = {}, 0
    for k in keys:
        n = base_sd[k].numel()
        out[k] = flat[i:i + n].reshape(base_sd[k].shape)
        i += n
    return out


def _state_dicts(seed, quantized=False):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (4, 7), "scale": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = []
    for j in range(3):
        sd = {}
        for k, s in shapes.items():
            tau = torch.randn(s, generator=g) * (j + 1) * (3.0 if k == "b.weight" else 1.0)
            if quantized:  # many exact ties in |τ|
                tau = torch.round(tau * 4) / 4
            sd[k] = base[k] + tau
        experts.append(sd)
    return base, experts


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.0])
def test_global_scope_matches_naive_reference(quantized, density):
    base, experts = _state_dicts(3, quantized)
    if quantized:  # base on a coarse grid too, so that τ = θ_t − θ_0 stays exactly on the grid
        base = {k: torch.round(v * 4) / 4 for k, v in base.items()}
        experts = [{k: base[k] + torch.round((sd[k] - base[k]) * 4) / 4 for k in sd}
                   for sd in experts]
    ref = _naive_global_ties(base, experts, density)
    got = merge_state_dicts("ties", base, experts, scope="global", density=density)
    for k in base:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k
    per_tensor = merge_state_dicts("ties", base, experts, density=density)
    if density == 0.2:  # b.weight has the large deltas: the scopes really differ
        assert not all(torch.allclose(per_tensor[k], ref[k]) for k in base)


def test_global_scope_majority_sign_with_exact_cancellation():
    base = {"x": torch.zeros(4), "y": torch.zeros(3)}
    # x[0] cancels exactly (+5, -5) and is kept by the trim; the rest of the model votes '-'
    e1 = {"x": torch.tensor([5.0, -3.0, -2.0, -1.0]), "y": torch.tensor([-4.0, -1.0, 0.5])}
    e2 = {"x": torch.tensor([-5.0, -3.0, -2.0, -1.0]), "y": torch.tensor([-4.0, -1.0, 0.5])}
    ref = _naive_global_ties(base, [e1, e2], 0.5)
    got = merge_state_dicts("ties", base, [e1, e2], scope="global", density=0.5,
                            conventions="paper")
    assert ref["x"][0] == -5.0
    for k in base:
        assert torch.equal(got[k], ref[k]), k


def test_global_thresholds_exact_over_many_magnitudes():
    g = torch.Generator().manual_seed(7)
    tensors = [torch.exp(torch.randn(n, generator=g) * 6) * torch.sign(torch.randn(n, generator=g))
               for n in (1000, 3, 4096, 17)]
    flat = torch.cat(tensors).abs()
    d = flat.numel()

    def groups():
        for i, t in enumerate(tensors):
            yield TensorGroup(name=f"t{i}", base=torch.zeros_like(t), experts=[t, 2 * t],
                              params={}, ctx=MergeContext(name=f"t{i}"))

    for density in (0.01, 0.3, 0.9):
        stats = global_thresholds(groups, [density, density])
        m = d - int(density * d)
        assert stats["thresholds"][0] == float(torch.kthvalue(flat, m).values)
        assert stats["thresholds"][1] == float(torch.kthvalue(2 * flat, m).values)
    assert global_thresholds(groups, [1.0, 1.0])["thresholds"] == [None, None]


def test_prepare_is_a_no_op_for_per_tensor_scope():
    spec = get_method("ties")
    base, experts = _state_dicts(0)
    params = spec.resolve(3, {}, "t")

    def groups():
        for k in base:
            yield TensorGroup(name=k, base=base[k], experts=[e[k] for e in experts],
                              params=params, ctx=MergeContext(name=k))

    assert spec.execution.prepare.run(groups) is None


def test_global_scope_without_prepare_is_a_clear_error(run):
    from modelalloy.errors import MethodError

    with pytest.raises(MethodError, match="scope"):
        run("ties", [0.0], [[1.0]], scope="global")


@pytest.mark.parametrize("quantized", [False, True])
def test_kth_largest_is_exact_on_large_tensors(quantized):
    from modelalloy.methods.orderstats import kth_largest

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(50_000, generator=g) * 0.01).abs()
    if quantized:
        x = torch.round(x * 2000) / 2000  # heavy ties
    ordered = torch.sort(x, descending=True).values
    for k in (1, 7, 10_000, 49_999, 50_000):
        assert kth_largest(x, k) == ordered[k - 1]
    trimmed = magnitude_trim_(x.clone(), 0.3)
    assert int(trimmed.count_nonzero()) <= 15_000
    assert int((trimmed != 0).sum()) == min(15_000, int(x.count_nonzero()))


def _naive_mergekit_ties(base, experts, weights, densities, lam=1.0):
    """mergekit's ties (per tensor, argsort top-k, weighted vote, zero -> +, weighted mean)."""
    deltas = []
    for e, dens in zip(experts, densities, strict=True):
        d = (e - base).reshape(-1)
        k = int(dens * d.numel())
        keep = torch.zeros_like(d)
        keep[torch.argsort(d.abs(), descending=True)[:k]] = 1
        deltas.append((d * keep).reshape(base.shape))
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    wd = torch.stack(deltas) * w
    majority = (wd.sum(0) >= 0).float() * 2 - 1
    mask = wd.sign() == majority
    mixed = (wd * mask).sum(0)
    div = (w * mask).sum(0)
    div[div == 0] = 1
    return base + lam * mixed / div


def test_per_tensor_weighted_vote_matches_mergekit_formula(run):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(7, 9, generator=g)
    experts = [base + torch.randn(7, 9, generator=g) for _ in range(3)]
    weights, densities = [1.0, 0.5, 2.0], [0.3, 0.6, 0.45]
    want = _naive_mergekit_ties(base, experts, weights, densities, lam=0.8)
    got = run("ties", base, experts, weight=weights, density=densities, vote="weighted",
              **{"lambda": 0.8})
    assert torch.allclose(got, want, atol=1e-6)


def test_global_scope_with_per_model_densities():
    base, experts = _state_dicts(9)
    keys = sorted(base)
    densities = [0.15, 0.5, 1.0]
    flat_base = torch.cat([base[k].reshape(-1) for k in keys])
    rows = [torch.cat([sd[k].reshape(-1) for k in keys]) - flat_base for sd in experts]
    d = flat_base.numel()
    kept = []
    for row, dens in zip(rows, densities, strict=True):
        if dens >= 1:
            kept.append(row)
            continue
        v = torch.kthvalue(row.abs(), d - int(dens * d)).values
        kept.append(row * (row.abs() >= v))
    kept = torch.stack(kept)
    sign = torch.sign(kept.sum(0))
    agree = (kept * sign) > 0
    flat = flat_base + (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
    got = merge_state_dicts("ties", base, experts, scope="global", density=densities)
    i = 0
    for k in keys:
        n = base[k].numel()
        assert torch.allclose(got[k].reshape(-1), flat[i:i + n], atol=1e-6), k
        i += n


def test_rescale_restores_the_l1_norm_like_mergekit(run):
    # trimmed [0, -4, 3, 0] has L1 7; the original has L1 7.3
    out = run("ties", [0.0] * 4, [[0.1, -4.0, 3.0, 0.2]], density=0.5, rescale=True)
    assert torch.allclose(out, torch.tensor([0.0, -4.0, 3.0, 0.0]) * (7.3 / 7.0))
