"""Every recipe of benchmarks/mergekit_recipes.py (mergekit's examples and its test
configurations) merges unchanged; with mergekit installed (MERGEKIT_YAML, PATH or
../venv-mergekit) the outputs equal mergekit's, tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelalloy import merge
from tests.conftest import load_benchmark

BENCH = load_benchmark("mergekit_recipes")
# Compared against a real mergekit when it is installed: one recipe per family of behaviour.
AGAINST_MERGEKIT = ["ties-example", "ties-negative", "breadcrumbs-density", "breadcrumbs_ties",
                    "slerp-gradient", "nuslerp-columns-base", "karcher", "sce", "ramplus_tl",
                    "arcee_fusion", "frankenmerge", "dare_ties"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return BENCH.build_models(tmp_path_factory.mktemp("families"))


def _recipe(tmp_path, models, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(BENCH.RECIPES[name].format(**models) + "dtype: float32\n")
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(BENCH.RECIPES))
def test_every_recipe_merges(tmp_path, models, name):
    result = merge(_recipe(tmp_path, models, name), tmp_path / "out")
    assert result.tensors > 0 and (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", AGAINST_MERGEKIT)
def test_equals_mergekit(tmp_path, models, name):
    binary = BENCH.find_mergekit()
    if binary is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML to its mergekit-yaml)")
    recipe = _recipe(tmp_path, models, name)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert BENCH.run_modelalloy(recipe, ours) == "yes"
    assert BENCH.run_mergekit(binary, recipe, theirs) == "yes"
    text = recipe.read_text()
    base = Path(models["base"]) if f"base_model: {models['base']}" in text else None
    ok, why = BENCH.compare(ours, theirs, base, name.startswith(BENCH.RANDOM))
    assert ok, why
