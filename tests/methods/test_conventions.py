"""``conventions``: mergekit's defaults and variants by default, the papers' with
``conventions: paper`` — each difference on a case worked out by hand."""

from __future__ import annotations

import pytest
import torch

from modelalloy.errors import MethodError, RecipeError
from modelalloy.recipe import RecipeWarning, parse_recipe
from modelalloy.recipe.resolve import resolve_tensor_params


def test_ties_votes_with_the_weighted_sum_by_default(run):
    # τ1 = 2 (w 1), τ2 = −1 (w 3): the paper's vote sign(2 − 1) = + keeps τ1; mergekit's
    # sign(1·2 + 3·(−1)) = − keeps τ2 (÷ its weight: −1)
    base, experts = [0.0], [[2.0], [-1.0]]
    assert run("ties", base, experts, weight=[1.0, 3.0], conventions="mergekit").item() == -1.0
    assert run("ties", base, experts, weight=[1.0, 3.0], conventions="paper").item() == 2.0


def test_ties_negative_weight_follows_mergekits_agreement(run):
    # u = w·τ: (2, 1) and −(3, 1) = (−3, −1); Σu = (−1, 0) -> γ = (−, +).
    # Entry 0: only u2 agrees: −3 / w2 = −3 / −1 = 3. Entry 1: only u1: 1 / 1 = 1.
    out = run("ties", [0.0, 0.0], [[2.0, 1.0], [3.0, 1.0]], weight=[1.0, -1.0],
              conventions="mergekit")
    assert torch.equal(out, torch.tensor([3.0, 1.0]))


def test_breadcrumbs_masks_the_whole_tensor_with_mergekits_tie_order(run):
    # |τ| = (1, 3, 3, 2), density 0.5, gamma 0.25: n_top = 1, n_keep = 2.
    # mergekit sorts |τ| ascending, stably: indices (0, 3, 1, 2); it keeps [1:3] = {3, 1}.
    # The paper (per row, equal magnitudes ranked by position, lower index first) removes
    # index 1 as the largest and keeps {2, 3}.
    tau = [[1.0, 3.0, 3.0, 2.0]]
    out = run("breadcrumbs", [0.0] * 4, tau, density=0.5, gamma=0.25, conventions="mergekit")
    assert torch.equal(out, torch.tensor([0.0, 3.0, 0.0, 2.0]))
    out = run("breadcrumbs", [0.0] * 4, tau, density=0.5, gamma=0.25, conventions="paper")
    assert torch.equal(out, torch.tensor([0.0, 0.0, 3.0, 2.0]))


def test_breadcrumbs_at_density_one_is_task_arithmetic_in_mergekit(run):
    tau = torch.arange(1.0, 101.0)  # 100 entries: gamma 0.01 removes the largest per row
    out = run("breadcrumbs", torch.zeros(100), [tau], conventions="mergekit")
    assert torch.equal(out, tau)
    out = run("breadcrumbs", torch.zeros(100), [tau], conventions="paper")
    assert out[-1].item() == 0.0 and torch.equal(out[:-1], tau[:-1])


@pytest.mark.parametrize("method,extra", [("dare_linear", {}), ("della_linear",
                                                                 {"epsilon": 0.1})])
def test_dare_and_della_rescale_to_the_l1_norm_by_default(run, method, extra):
    tau = torch.linspace(0.1, 2.0, 400)
    out = run(method, torch.zeros(400), [tau], density=0.5, conventions="mergekit", **extra)
    assert 0 < int((out != 0).sum()) < 400
    assert abs(float(out.abs().sum()) - float(tau.abs().sum())) < 1e-3 * float(tau.sum())
    paper = run(method, torch.zeros(400), [tau], density=0.5, conventions="paper", **extra)
    # the paper divides by the keep probability instead: the L1 norm is only kept on average
    assert float(paper.abs().sum()) != pytest.approx(float(tau.abs().sum()), rel=1e-4)


def test_linear_accepts_negative_weights_that_do_not_cancel(run):
    out = run("linear", None, [[1.0], [4.0]], weight=[2.0, -1.0], conventions="mergekit")
    assert out.item() == pytest.approx((2 * 1 - 4) / 1)


# -- the recipe level ------------------------------------------------------------------------

RECIPE = "merge_method: {m}\nbase_model: ./base\nmodels:\n  - model: ./a\n{extra}"


def test_slerp_needs_t_and_ignores_weight_with_a_warning():
    with pytest.raises(MethodError, match=r"parameters.*slerp' needs parameter 't'"):
        parse_recipe(RECIPE.format(m="slerp", extra=""))
    with pytest.warns(RecipeWarning, match=r"models\[0\]\.parameters\.weight.*ignored: method "
                                           r"'slerp' does not use 'weight'"):
        r = parse_recipe(RECIPE.format(m="slerp", extra="    parameters: {weight: 0.5}\n")
                         + "parameters: {t: 0.3}\n")
    assert resolve_tensor_params(r, "x", None, None) == {"t": 0.3}


def test_model_stock_ignores_weight_with_a_warning():
    text = ("merge_method: model_stock\nbase_model: ./base\nmodels:\n"
            "  - model: ./a\n    parameters: {weight: 1.0}\n  - model: ./b\n")
    with pytest.warns(RecipeWarning, match="does not use 'weight'"):
        parse_recipe(text)


def test_negative_weights_by_conventions():
    text = RECIPE.format(m="ties", extra="    parameters: {weight: -0.5}\n")
    with pytest.warns(RecipeWarning, match="negative weight"):
        r = parse_recipe(text)
    assert r.conventions == "mergekit"
    assert resolve_tensor_params(r, "x", None, None)["weight"] == [-0.5]
    with pytest.raises(RecipeError, match="allow_negative_weights"):
        parse_recipe(text + "conventions: paper\n")


def test_conventions_pick_the_defaults_and_round_trip():
    r = parse_recipe(RECIPE.format(m="ties", extra=""))
    assert resolve_tensor_params(r, "x", None, None)["vote"] == "weighted"
    p = parse_recipe(RECIPE.format(m="ties", extra="") + "conventions: paper\n")
    assert resolve_tensor_params(p, "x", None, None)["vote"] == "paper"
    assert "conventions: paper" in p.to_yaml()
    assert parse_recipe(p.to_yaml()).conventions == "paper"
    with pytest.raises(RecipeError, match="conventions.*mergekit, paper"):
        parse_recipe(RECIPE.format(m="ties", extra="") + "conventions: papers\n")


def test_unknown_parameter_is_an_error_with_a_suggestion():
    with pytest.raises(MethodError, match="no parameter 'densty'; did you mean 'density'"):
        parse_recipe(RECIPE.format(m="ties", extra="    parameters: {densty: 0.5}\n"))
