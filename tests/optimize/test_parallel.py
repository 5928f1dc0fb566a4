"""Parallel trials on a local Ray (2 CPUs): the same seed gives the same trials and recipe with
1 or 2 workers (results come back in candidate order, whichever worker scored them)."""

from __future__ import annotations

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
