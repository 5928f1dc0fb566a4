"""MoE assembly: dense experts of one base become one sparse Mixtral-style model.

- :mod:`.config`: the recipe (mergekit-moe's YAML format) and its checks.
- :mod:`.gates`: router weights from prompts (``hidden``, ``cheap_embed``) or at random.
- :mod:`.build`: the output model, written tensor by tensor.
"""

from modelalloy.moe.build import build_moe
from modelalloy.moe.config import MoERecipe, load_moe_recipe

__all__ = ["MoERecipe", "build_moe", "load_moe_recipe"]
