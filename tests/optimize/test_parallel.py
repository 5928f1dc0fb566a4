"""Parallel trials on a local Ray (2 CPUs): the same seed gives the same trials and recipe with
1 or 2 workers (results come back in candidate order, whichever worker scored them)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray")
pytest.importorskip("cma")

from modelalloy.search.driver import optimize  # noqa: E402
from tests.optimize.conftest import write_template  # noqa: E402

QUAD = "python:tests.optimize.synthetic:quadratic"


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_search(tmp_path):
    tpl = write_template(tmp_path, search={"granularity": "layer",
                                           "parameters": {"weight": [0, 1]}})
    one = optimize("evolve", tpl, [QUAD], tmp_path / "one", budget=16, seed=2)
    two = optimize("evolve", tpl, [QUAD], tmp_path / "two", budget=16, seed=2, workers=2)
    assert [(r["candidate"], r["scores"]) for r in one.trials] == \
        [(r["candidate"], r["scores"]) for r in two.trials]
    assert one.recipe_path.read_text() == two.recipe_path.read_text()


@pytest.mark.slow
def test_a_failing_candidate_on_two_workers_keeps_the_same_trials(tmp_path):
    # the objective fails on a candidate (not on a call count), so the run stops at the same
    # trial with 1 and 2 workers, keeping the trials before it, whatever batch it was in
    from modelalloy.errors import OptimizeError

    tpl = write_template(tmp_path, search={"parameters": {"weight": [0, 1]}})
    obj = "python:tests.optimize.synthetic:fails_on_light_first_expert"
    errors, kept = [], []
    for name, workers in (("one", 1), ("two", 2)):
        with pytest.raises(OptimizeError, match="first expert too light") as err:
            optimize("evolve", tpl, [obj], tmp_path / name, budget=40, seed=4,
                     workers=workers)
        errors.append(str(err.value).replace(str(tmp_path / name), "OUT"))
        rows = [json.loads(line) for line in
                (tmp_path / name / "trials.jsonl").read_text().splitlines()]
        kept.append([(r["trial"], r["candidate"], r["scores"]) for r in rows])
    assert errors[0] == errors[1]
    assert kept[0] == kept[1]
    # seed 4 first draws a weight under 0.2 at trial 25: inside the fourth batch of 8, the
    # second candidate of a worker's chunk of 2; the 25 trials before it are kept
    assert len(kept[0]) == 25
