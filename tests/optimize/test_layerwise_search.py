"""layerwise_search on the layer-wise quadratic: it beats the best uniform (task-wise)
configuration, whose value is worked out here by least squares, and it prunes with
successive halving."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("optuna")

from modelalloy.search.driver import optimize  # noqa: E402
from tests.optimize import synthetic  # noqa: E402

OBJ = "python:tests.optimize.synthetic:layers_with_fidelity"


def best_uniform_fitness() -> float:
    """max over one weight pair c of −mean_n mean((θ₀ + Σ c_k τ_k − θ*_n)²): a linear least
    squares in c over all the float tensors (each weighted by 1/numel)."""
    base, experts = synthetic.family()
    target = synthetic._target(synthetic.LAYER_TARGET)
    rows, rhs = [], []
    for n, t in target.items():
        w = (1.0 / t.numel()) ** 0.5
        rows.append(torch.stack([(e[n] - base[n]).flatten() * w for e in experts], 1))
        rhs.append((t - base[n]).flatten() * w)
    a, b = torch.cat(rows).double(), torch.cat(rhs).double()
    c = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    merged = {n: base[n] + sum(float(c[k]) * (e[n] - base[n]) for k, e in enumerate(experts))
              for n in target}
    return synthetic._distance(merged, target)


def test_beats_the_best_uniform_configuration(template, tmp_path):
    res = optimize("layerwise_search",
                   template(search={"granularity": "layer", "parameters": {"weight": [0, 1]}}),
                   [OBJ], tmp_path / "out", budget=80, seed=0)
    uniform = best_uniform_fitness()
    assert res.best["scores"]["fitness"] > uniform + 0.05, (res.best["scores"], uniform)
    # successive halving: cheap rungs were scored, and some configurations never reached 1
    fids = [r["candidate"].get("fidelity", 1.0) if isinstance(r["candidate"], dict) else 1.0
            for r in res.trials]
    assert min(fids) == pytest.approx(1 / 9) and res.notes["pruned"] > 0
    assert res.notes["completed"] < len(res.trials)
    assert not isinstance(res.best["candidate"], dict)  # the result is a full-fidelity trial


def test_a_budget_below_one_full_rung_still_gives_a_recipe(template, tmp_path):
    res = optimize("layerwise_search", template(), [OBJ], tmp_path / "out", budget=3)
    assert not isinstance(res.best["candidate"], dict) and res.best["tag"] == "final"
    assert len(res.trials) == 4 and res.recipe_path.is_file()
