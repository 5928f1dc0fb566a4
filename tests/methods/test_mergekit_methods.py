"""The methods mergekit has beyond the task-vector family, against numbers worked out by hand
from each method's equation (see the method modules' docstrings)."""

from __future__ import annotations

import math

import pytest
import torch

from modelalloy.errors import MethodError

H = math.sqrt(0.5)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32),
                          torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# -- passthrough, nearswap ------------------------------------------------------------------


def test_passthrough_copies_and_scales(run):
    assert torch.equal(run("passthrough", None, [[1.0, -2.0]]), torch.tensor([1.0, -2.0]))
    assert torch.equal(run("passthrough", None, [[1.0, -2.0]], scale=2.0),
                       torch.tensor([2.0, -4.0]))
    with pytest.raises(MethodError, match="exactly 1"):
        run("passthrough", None, [[1.0], [2.0]])


def test_nearswap_takes_near_values_and_moves_toward_far_ones(run):
    # distances 0.1, 1, 4 with t = 0.5: w = 1, 0.5, 0.125
    out = run("nearswap", [0.0, 0.0, 0.0], [[0.1, 1.0, -4.0]], t=0.5)
    assert close(out, [0.1, 0.5, -0.5])
    with pytest.raises(MethodError, match="needs parameter 't'"):
        run("nearswap", [0.0], [[1.0]])


# -- nuslerp ----------------------------------------------------------------------------------


def test_nuslerp_flattened_mixes_by_the_weights(run):
    # orthogonal unit vectors: Ω = π/2; t = w2/(w1+w2)
    assert close(run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]]), [H, H])
    out = run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, 3.0])
    assert close(out, [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])


def test_nuslerp_with_a_base_interpolates_task_vectors(run):
    base = torch.tensor([1.0, 1.0])
    out = run("nuslerp", base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])])
    assert close(out, [1 + H, 1 + H])


def test_nuslerp_negative_weight_extrapolates(run):
    # t = −1/(2 − 1) = −1: (sin(2Ω)·v1 + sin(−Ω)·v2)/sin Ω with Ω = π/2 gives −v2
    out = run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], weight=[2.0, -1.0])
    assert close(out, [0.0, -1.0])


def test_nuslerp_per_row_and_per_column(run):
    a = [[1.0, 0.0], [1.0, 0.0]]
    b = [[0.0, 1.0], [2.0, 0.0]]
    # rows: row 0 orthogonal -> (h, h); row 1 colinear -> the lerp 0.5·(1,0) + 0.5·(2,0)
    out = run("nuslerp", None, [a, b], nuslerp_flatten=False)
    assert close(out, [[H, H], [1.5, 0.0]])
    # columns (nuslerp_row_wise): column 0 is (1,1) vs (0,2), column 1 is (0,0) vs (1,0)
    a2 = [[1.0, 2.0], [0.0, 0.0]]
    b2 = [[0.0, 2.0], [1.0, 0.0]]
    out = run("nuslerp", None, [a2, b2], nuslerp_flatten=False, nuslerp_row_wise=True)
    # column 0: (1,0) vs (0,1) -> (h, h); column 1: (2,0) vs (2,0) colinear -> (2, 0)
    assert close(out, [[H, 2.0], [H, 0.0]])


# -- multislerp, karcher ----------------------------------------------------------------------


def test_multislerp_is_the_normalized_weighted_direction_times_the_mean_norm(run):
    # m = 0.75·e1 + 0.25·e2, m̂ = (3, 1)/√10; the tangent mean Σ w τ_i is m − ‖m‖ m̂ = 0, so the
    # result is m̂ · Σ w_i n_i = m̂ · (0.75·2 + 0.25·1)
    out = run("multislerp", None, [[2.0, 0.0], [0.0, 1.0]], weight=[3.0, 1.0])
    assert close(out, [1.75 * 3 / math.sqrt(10), 1.75 / math.sqrt(10)])
    base = torch.tensor([5.0, 5.0])
    out = run("multislerp", base, [base + torch.tensor([1.0, 0.0]),
                                   base + torch.tensor([0.0, 1.0])])
    assert close(out, [5 + H, 5 + H])


def test_multislerp_antipodal_pair_falls_back_to_the_lerp_and_three_are_refused(run):
    assert close(run("multislerp", None, [[1.0, 0.0], [-1.0, 0.0]]), [0.0, 0.0])
    with pytest.raises(MethodError, match="zero"):
        run("multislerp", None, [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], weight=[1.0, 1.0, 0.0])


def test_karcher_mean_on_the_circle_is_the_mean_angle(run):
    # directions at 0°, 0°, 90°: the Karcher mean on the circle is the mean angle, 30°;
    # every norm is 1
    out = run("karcher", None, [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert close(out, [math.cos(math.pi / 6), math.sin(math.pi / 6)], 1e-5)
    # two orthogonal vectors of norms 2 and 1: the 45° direction times the mean norm 1.5
    assert close(run("karcher", None, [[2.0, 0.0], [0.0, 1.0]]), [1.5 * H, 1.5 * H])


def test_karcher_counts_the_base_as_a_point(run):
    # as in mergekit: a zero base adds a zero norm to the mean norm (2 + 1 + 0)/3
    out = run("karcher", [0.0, 0.0], [[2.0, 0.0], [0.0, 1.0]])
    assert close(out, [H, H])


# -- sce, ram, arcee_fusion -------------------------------------------------------------------


def test_sce_weights_by_energy_and_erases_minority_signs(run):
    base = [0.0, 0.0, 0.0, 0.0]
    e1, e2 = [1.0, 2.0, -3.0, 0.0], [3.0, -2.0, 1.0, 0.0]
    # energies 3.5, 3.5 -> w = 0.5 each; γ = sign of (4, 0, −2, 0) with 0 -> +
    # agreeing: (both, e1, e1, none) -> (2, 2, −3, 0)
    assert close(run("sce", base, [e1, e2]), [2.0, 2.0, -3.0, 0.0])
    # select_topk 0.5: variances (1, 4, 4, 0), 3 nonzero -> k = 1, the first of the tied 4s
    # (position 1): τ = (0, 2, 0, 0) and (0, −2, 0, 0); γ(0) = + -> e1's 2
    assert close(run("sce", base, [e1, e2], select_topk=0.5), [0.0, 2.0, 0.0, 0.0])


def test_ram_keeps_unique_changes_and_averages_shared_ones(run):
    base = torch.zeros(2, 3)
    e1 = [[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]
    e2 = [[1.0, 5.0, 0.0], [0.0, 0.0, -1.0]]
    assert close(run("ram", base, [e1, e2]), [[1.0, 5.0, 2.0], [0.0, 0.0, 1.0]])
    # each model: 2 shared and 1 unique change -> ρ = 2, capped at α = 0.2 -> λ = 1.02
    assert close(run("ramplus_tl", base, [e1, e2]), [[1.0, 5.1, 2.04], [0.0, 0.0, 1.0]])
    # changes at or below epsilon do not count
    assert close(run("ram", [0.0], [[1e-6]]), [0.0])


def test_arcee_fusion_keeps_the_outlier_changes(run):
    # rows (d, 0) against a zero base: s = d·KL(softmax(d, 0) ‖ (½, ½)) in column 0, 0 in
    # column 1. KL(1) = 0.11094, KL(2) = 0.32782, KL(3) = 0.50228, KL(4) = 0.60305, so the
    # sorted scores are (0, 0, 0, 0, 0.111, 0.656, 1.507, 2.412): median (index 3) 0,
    # Q1 (index 1) 0, Q3 (index 5) 0.656 -> threshold 1.5·0.656 = 0.983: rows 3 and 4 change.
    other = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]
    out = run("arcee_fusion", torch.zeros(4, 2), [other])
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [4.0, 0.0]]))
