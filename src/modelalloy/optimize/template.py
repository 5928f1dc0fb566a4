"""Reading a search template: the ``search.space`` it names decides which space it is — the
parameter space (:mod:`modelalloy.optimize.space`), the data-flow space
(:mod:`modelalloy.optimize.dataflow`) or both in one run (:mod:`modelalloy.optimize.hybrid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelalloy.optimize.dataflow import build_dataflow_space
from modelalloy.optimize.hybrid import build_hybrid_space
from modelalloy.optimize.space import build_space, reference_float_names, split_template
from modelalloy.recipe.load import _load_yaml, read_recipe_text, recipe_from_dict
from modelalloy.recipe.model import Recipe


def load_template(path: str | Path, float_names: Sequence[str] | None = None
                  ) -> tuple[Any, Recipe]:
    """Read a template YAML; ``float_names`` default to the reference model's float tensors."""
    p = Path(path)
    data = _load_yaml(read_recipe_text(p), str(p))
    recipe_data, search = split_template(data, str(p))
    if search.get("space") == "dataflow":
        return build_dataflow_space(recipe_data, search, source=str(p),
                                    base_dir=p.resolve().parent, names_of=_model_names)
    if float_names is None:
        recipe = recipe_from_dict(recipe_data, source=str(p), base_dir=p.resolve().parent)
        float_names = reference_float_names(recipe)
    if search.get("space") == "ps+dfs":
        return build_hybrid_space(data, search, source=str(p), base_dir=p.resolve().parent,
                                  float_names=float_names, names_of=_model_names)
    return build_space(data, source=str(p), base_dir=p.resolve().parent,
                       float_names=float_names)


def _model_names(recipe: Recipe, model: str) -> list[str]:
    from modelalloy.engine.run import open_recipe_model

    with open_recipe_model(recipe, model) as src:
        return list(src.names())
