"""MAP on two exactly quadratic scores: the surrogates are exact, the predicted front matches
the re-evaluated one, and the preference picks the optimum worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pymoo")

from modelalloy.optimize.map_search import Surrogate, design_points  # noqa: E402
from modelalloy.search.driver import optimize  # noqa: E402
from tests.optimize import synthetic  # noqa: E402

TWO = "python:tests.optimize.synthetic:two_tasks"


def test_design_points_one_hots_first_and_no_isotropic():
    pts = design_points(2, 12, np.random.default_rng(0))
    assert pts[:2] == [[1.0, 0.0], [0.0, 1.0]] and len(pts) == 12
    assert all(not np.allclose(p, p[0]) for p in pts[2:])


def test_sigmoid_surrogate_recovers_a_warped_quadratic(monkeypatch):
    from modelalloy.optimize import map_search

    rng = np.random.default_rng(1)
    x = rng.uniform(size=(30, 2))
    z = -3 * x[:, 0] ** 2 + 2 * x[:, 0] * x[:, 1] + x[:, 1] - 0.5
    # the ridge term λ‖β‖² pulls β towards 0 by about λ·β/(JᵀJ): small here
    assert np.abs(Surrogate(x, 1 / (1 + np.exp(-z)), "sigmoid")(x)
                  - 1 / (1 + np.exp(-z))).max() < 3e-3
    monkeypatch.setattr(map_search, "RIDGE", 0.0)  # without it the fit is exact
    m = Surrogate(x, 1 / (1 + np.exp(-z)), "sigmoid")
    assert np.abs(m(x) - 1 / (1 + np.exp(-z))).max() < 1e-6


def test_sigmoid_surrogate_of_saturated_accuracies_ignores_the_last_bit():
    """Issue 15: accuracies at 0 and 1 have no finite unpenalised fit; the fit must not hang
    on the last bit of its inputs (processes differ there), or one seed gives two fronts.
    scipy's curve_fit from all-ones moved these predictions by 4e-5."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(20, 3))
    y = np.where(x.sum(axis=1) > 1.5, 1.0, 0.0)
    y[::4] = 0.5
    a = Surrogate(x, y, "sigmoid")
    b = Surrogate(x, y * (1 + 1e-15), "sigmoid")
    assert np.abs(a(x) - b(x)).max() < 1e-12
    assert np.abs(a.beta).max() < 100  # finite, not running off to ±1e6


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


def test_hyperspherical_angles_round_trip():
    from modelalloy.optimize.map_search import from_angles, to_angles

    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.3, 0.3]])
    phi = to_angles(x)
    assert np.allclose(phi[:, 0], [np.pi / 2, 0.0, np.pi / 4])
    assert np.allclose(from_angles(phi, np.linalg.norm(x, axis=1)), x)
    x3 = np.array([[0.2, 0.4, 0.4]])
    # φ₁ = atan2(√(0.16+0.16), 0.2), φ₂ = atan2(0.4, 0.4) = π/4
    assert np.allclose(to_angles(x3), [[np.arctan2(np.sqrt(0.32), 0.2), np.pi / 4]])
    assert np.allclose(from_angles(to_angles(x3), np.array([0.6])), x3)


def test_bayesian_sampling_goes_where_the_surrogate_errs():
    from modelalloy.optimize.map_search import adaptive_points, bin_probabilities

    # d = 2: 4 angle bins over [0, π/2]; errors 1 in bin 2 (angles 45°-67.5°), 0.01 elsewhere
    rng = np.random.default_rng(0)
    angles = np.linspace(0.02, np.pi / 2 - 0.02, 40)
    x = 0.7 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    errors = np.where((angles >= np.pi / 4) & (angles < 3 * np.pi / 8), 1.0, 0.01)
    bins, p = bin_probabilities(x, errors, 4, rng)
    assert bins == [(0,), (1,), (2,), (3,)]
    # softmax((1 - 0.01)/0.07) puts all but e^-14 of the mass on bin 2
    assert p[2] > 1 - 1e-5 and abs(p.sum() - 1) < 1e-12
    pts = np.array(adaptive_points(x, errors, 20, rng))
    phi = np.arctan2(pts[:, 1], pts[:, 0])
    r = np.linalg.norm(pts, axis=1)
    assert ((phi >= np.pi / 4) & (phi < 3 * np.pi / 8)).all()
    assert ((r >= 0.2) & (r <= 0.8)).all()
    # an empty bin is never drawn (no points at angles below 22.5°)
    _, p = bin_probabilities(x[angles > np.pi / 8], errors[angles > np.pi / 8], 4, rng)
    assert p[0] == 0.0


def test_bayesian_map_adds_rounds_and_picks_the_known_optimum(template, tmp_path):
    res = optimize("map", template(), [TWO], tmp_path / "out", seed=0,
                   options={"variant": "bayesian", "schedule": "6,2,2", "generations": 60})
    tags = [t.get("tag") for t in res.trials]
    # 6 designed, then 2 rounds of 2 new points per metric (2 metrics), then the front
    assert tags[:6] == ["design"] * 6
    assert tags[6:10] == ["adaptive round 1"] * 4 and tags[10:14] == ["adaptive round 2"] * 4
    assert res.notes["design_points"] == 14 and res.notes["variant"] == "bayesian"
    assert res.notes["surrogate_fit_error"] < 1e-6 and res.notes["front_prediction_error"] < 1e-6
    w = res.best["candidate"]
    assert abs(w[0] - 0.5) < 0.06 and abs(w[1] - 0.5) < 0.06


def _best_weights(directions: list[dict], targets: list[dict]) -> np.ndarray:
    """argmax over a of −Σ_t dist(θ₀ + Σ_i a_i D_i, θ*_t) for the tensor-averaged squared
    distance of synthetic._distance: a linear least squares toward the mean target."""
    import torch

    base, _ = synthetic.family(3)
    names = list(targets[0])
    w = [(1.0 / targets[0][n].numel()) ** 0.5 for n in names]
    a = torch.cat([torch.stack([d[n].flatten() * wi for d in directions], 1)
                   for n, wi in zip(names, w, strict=True)]).double()
    mean_t = {n: sum(t[n] for t in targets) / len(targets) for n in names}
    b = torch.cat([(mean_t[n] - base[n]).flatten() * wi
                   for n, wi in zip(names, w, strict=True)]).double()
    return torch.linalg.lstsq(a, b[:, None]).solution[:, 0].numpy()


def test_nested_map_merges_the_closest_pair_first_and_composes_the_weights(template, tmp_path):
    res = optimize("map", template(n_experts=3), ["python:tests.optimize.synthetic:three_tasks"],
                   tmp_path / "out", seed=0, options={"variant": "nested", "generations": 60})
    rounds = res.notes["rounds"]
    # single-model scores −(1 − s_t)²·|τ_t|²: a and b (s = 1, 0.9) are the closest pair
    assert [r["pair"] for r in rounds] == [[["a"], ["b"]], [["c"], ["a", "b"]]]
    base, experts = synthetic.family(3)
    tau = [{n: e[n] - base[n] for n in synthetic.three_targets()[0]} for e in experts]
    targets = synthetic.three_targets()
    # round 1: the best (α, β) for tasks a and b, by least squares
    ab = _best_weights(tau[:2], targets[:2])
    assert np.abs(np.array(rounds[0]["alpha_beta"]) - ab).max() < 0.06
    # round 2: c against the merged pair, θ₀ + α'·(α τ_a + β τ_b) + β'·τ_c
    got = rounds[0]["alpha_beta"]
    pair = {n: got[0] * tau[0][n] + got[1] * tau[1][n] for n in tau[0]}
    cd = _best_weights([tau[2], pair], targets)
    assert np.abs(np.array(rounds[1]["alpha_beta"]) - cd).max() < 0.06
    # the result is one task-arithmetic genome: the composed weights
    a2, b2 = rounds[1]["alpha_beta"]
    w = res.best["candidate"]
    assert np.allclose(w, [b2 * got[0], b2 * got[1], a2], atol=1e-6)
    assert res.notes["front_prediction_error"] < 1e-6
    # single models (3), then per round 20 designed points and the pick
    assert len(res.trials) == 3 + 2 * 21


def _run_record(out) -> tuple[list[dict], str, str]:
    """The trials without their timings, the recipe and the front of a finished run."""
    trials = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
              for line in (out / "trials.jsonl").read_text().splitlines()]
    return trials, (out / "recipe.yaml").read_text(), (out / "front.json").read_text()


@pytest.mark.slow
def test_same_seed_gives_the_same_trials_and_recipe_here_and_in_another_process(lm_smoke,
                                                                               tmp_path):
    """Issue 15 on the tiny-lm smoke suite: accuracies in [0, 1] take the sigmoid surrogate
    (scipy's curve_fit), Bayesian MAP draws adaptive points, NSGA-III (pymoo) finds the front.
    Two runs in this process and one in a fresh process log the same trials and recipe."""
    import subprocess
    import sys

    import yaml

    from modelalloy.search.objectives import suite_template
    from tests.conftest import subprocess_env

    tpl = tmp_path / "template.yaml"
    tpl.write_text(yaml.safe_dump(suite_template("suite:tiny-lm?size=smoke")))
    obj = "suite:tiny-lm?size=smoke"
    opts = {"variant": "bayesian", "schedule": "12,2"}
    runs = []
    for name in ("one", "two"):
        optimize("map", tpl, [obj], tmp_path / name, seed=3, options=opts)
        runs.append(_run_record(tmp_path / name))
    child = subprocess.run(
        [sys.executable, "-m", "modelalloy", "optimize", "map", str(tpl), "--objective", obj,
         "--out", str(tmp_path / "child"), "--seed", "3", "--option", "variant=bayesian",
         "--option", "schedule=12,2"], env=subprocess_env(), capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    runs.append(_run_record(tmp_path / "child"))
    trials = runs[0][0]
    # 12 designed, 2 per metric (len, max) in the adaptive round, then the re-scored front
    assert [t.get("tag") for t in trials[:16]] == ["design"] * 12 + ["adaptive round 1"] * 4
    assert json.loads((tmp_path / "one" / "notes.json").read_text())["warp"] == "sigmoid"
    assert runs[1] == runs[0] and runs[2] == runs[0]


@pytest.mark.parametrize("kwargs,needle", [
    ({"options": {"points": 5}}, "points=6"),  # a quadratic in 2 genes has 6 coefficients
    ({"budget": 4}, "budget=6"),
])
def test_too_few_points_for_the_quadratic_is_one_line(template, tmp_path, kwargs, needle):
    from modelalloy.errors import OptimizeError

    with pytest.raises(OptimizeError, match=needle):
        optimize("map", template(), [TWO], tmp_path / "out", seed=0, **kwargs)
