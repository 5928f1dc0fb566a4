"""FW-Merging on a pool with one relevant model and two irrelevant ones: the first step goes
to the relevant vertex (its cosine with the gradient is about −1/√2, the others' about 0), the
gradient there is zero, and the result is that model exactly — irrelevant models cost
nothing."""

from __future__ import annotations

import pytest
import torch

from modelalloy.optimize.fw_merging import frank_wolfe
from modelalloy.recipe.load import load_recipe
from modelalloy.search.driver import optimize
from tests.optimize import synthetic

REL = "python:tests.optimize.synthetic:close_to_expert1"


def test_frank_wolfe_lands_on_the_relevant_model():
    base, experts = synthetic.family(3)
    seen = []
    c = frank_wolfe(lambda p: -synthetic.close_to_expert1(p), base, experts,
                    granularity="task", iterations=5, step_size=1.0, scaling=1.0, init="base",
                    on_iterate=lambda t, cc: seen.append(cc))
    assert torch.equal(c[0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert len(seen) == 2  # x_0, x_1 = θ_1; then the gradient vanishes


def test_fw_step_sizes_follow_2_over_t_plus_2():
    # the vertex stays expert 1; c_1 after t steps: 1 − Π (1 − s·γ_i), γ_i = η·2/(i+2)
    base, experts = synthetic.family(3)
    c = frank_wolfe(lambda p: -synthetic.close_to_expert1(p), base, experts,
                    granularity="task", iterations=3, step_size=0.5, scaling=1.0, init="base")
    keep = 1.0
    for i in range(3):
        keep *= 1 - 0.5 * 2 / (i + 2)
    assert float(c[0, 1]) == pytest.approx(1 - keep, abs=1e-12)
    assert float(c[0, 0]) == 0.0 and float(c[0, 2]) == 0.0


def test_fw_merging_through_optimize(template, tmp_path):
    tpl = template(n_experts=3)
    res = optimize("fw_merging", tpl, [REL], tmp_path / "out", budget=4,
                   options={"step_size": 1.0, "scaling": 1.0, "init": "base"})
    weights = [e.parameters["weight"] for e in load_recipe(res.recipe_path).expert_entries()]
    assert weights == [0.0, 1.0, 0.0]
    assert res.best["scores"]["fitness"] == pytest.approx(0.0, abs=1e-12)


def test_fw_soft_moves_by_the_learned_coefficients():
    # a stub move learner that always says λ = 0.5: from the base, the relevant vertex (expert
    # 1) is chosen each time, so c_1 = 0.5, then 0.5 + 0.5·(1 − 0.5) = 0.75
    from modelalloy.optimize.fw_merging import frank_wolfe_soft

    base, experts = synthetic.family(3)
    inits = []

    def learn(x_t, vertices, init):
        inits.append(init)
        assert len(vertices) == 1 and torch.equal(vertices[0]["layers.0.weight"],
                                                  experts[1]["layers.0.weight"])
        return torch.full((len(x_t), 1), 0.5)

    c = frank_wolfe_soft([lambda p: -synthetic.close_to_expert1(p)], base, experts, learn,
                         iterations=2, init="base")
    assert torch.allclose(c[0], torch.tensor([0.0, 0.75, 0.0], dtype=torch.float64))
    assert inits == [0.3, 1e-8]  # FusionBench's fw_soft: 0.3 first, then 1e-8
