"""MAP on two exactly quadratic scores: the surrogates are exact, the predicted front matches
the re-evaluated one, and the preference picks the optimum worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pymoo")

from modelalloy.optimize.map_search import Surrogate, design_points  # noqa: E402
from modelalloy.search.driver import optimize  # noqa: E402

TWO = "python:tests.optimize.synthetic:two_tasks"


def test_design_points_one_hots_first_and_no_isotropic():
    pts = design_points(2, 12, np.random.default_rng(0))
    assert pts[:2] == [[1.0, 0.0], [0.0, 1.0]] and len(pts) == 12
    assert all(not np.allclose(p, p[0]) for p in pts[2:])


def test_sigmoid_surrogate_recovers_a_warped_quadratic():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(30, 2))
    z = -3 * x[:, 0] ** 2 + 2 * x[:, 0] * x[:, 1] + x[:, 1] - 0.5
    m = Surrogate(x, 1 / (1 + np.exp(-z)), "sigmoid")
    assert np.abs(m(x) - 1 / (1 + np.exp(-z))).max() < 1e-4


@pytest.mark.parametrize("pref,expect", [((1.0, 1.0), (0.5, 0.5)), ((1.0, 0.0), (0.2, 0.8))])
def test_preference_picks_the_known_optimum(template, tmp_path, pref, expect):
    res = optimize("map", template(), [TWO], tmp_path / "out", seed=0,
                   options={"preference": list(pref), "generations": 60})
    notes = res.notes
    assert notes["design_points"] == 12  # (d+1)(d+2) with d = 2 models
    assert notes["surrogate_fit_error"] < 1e-6  # the scores are exactly quadratic
    assert notes["front_prediction_error"] < 1e-6
    w = res.best["candidate"]
    assert abs(w[0] - expect[0]) < 0.06 and abs(w[1] - expect[1]) < 0.06
    front = json.loads((tmp_path / "out" / "front.json").read_text())
    assert sum("real" in row for row in front) == 5
    assert (tmp_path / "out" / "pareto.png").is_file()
    table = (tmp_path / "out" / "front.md").read_text().splitlines()
    assert len(table) == 2 + len(front) and "a predicted" in table[0]
