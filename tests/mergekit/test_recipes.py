"""Every recipe of benchmarks/mergekit_recipes.py (mergekit's examples and its test
configurations) merges unchanged; with mergekit installed (MERGEKIT_YAML, PATH or
../venv-mergekit) the outputs equal mergekit's, tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelalloy import merge
from tests.conftest import load_benchmark
from tests.mergekit.helpers import against_mergekit

BENCH = load_benchmark("mergekit_recipes")
# Compared against a real mergekit when it is installed: one recipe per family of behaviour.
AGAINST_MERGEKIT = ["ties-example", "ties-negative", "breadcrumbs-density", "breadcrumbs_ties",
                    "slerp-gradient", "nuslerp-columns-base", "karcher", "sce", "ramplus_tl",
                    "arcee_fusion", "frankenmerge", "dare_ties", "granite-slerp",
                    "modules-llama"]
# Llava: mergekit 0.1.5 writes no language-model tensors; the ones it writes equal ours.
MERGEKIT_DROPS = ["vlm-linear", "vlm-ties"]


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
    recipe = _recipe(tmp_path, models, name)
    text = recipe.read_text()
    base = Path(models["base"]) if f"base_model: {models['base']}" in text else None
    ok, why = against_mergekit(recipe, tmp_path, base, name.startswith(BENCH.RANDOM))
    assert ok, why


@pytest.mark.slow
@pytest.mark.parametrize("name", MERGEKIT_DROPS)
def test_mergekit_leaves_out_the_language_model(tmp_path, models, name):
    ok, why = against_mergekit(_recipe(tmp_path, models, name), tmp_path)
    assert not ok and why.startswith(BENCH.DROPS) and why.endswith("those equal ours"), why
    assert "lm_head.weight" in why or "language_model" in why
