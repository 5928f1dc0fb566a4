"""Recipes: mergekit-compatible YAML -> a validated :class:`Recipe`; per-tensor parameters.

See docs/recipes.md for the format, what matches mergekit and what is rejected.
"""

from modelalloy.recipe.load import RecipeWarning, load_recipe, parse_recipe, recipe_from_dict
from modelalloy.recipe.model import (
    Conditional,
    ModelEntry,
    ParamValue,
    Recipe,
    evaluate_setting,
    layer_position,
)
from modelalloy.recipe.resolve import resolve_tensor_params

__all__ = ["Conditional", "ModelEntry", "ParamValue", "Recipe", "RecipeWarning",
           "evaluate_setting", "layer_position", "load_recipe", "parse_recipe",
           "recipe_from_dict", "resolve_tensor_params"]
