"""Per-tensor parameter values, resolved the way mergekit's ``ConfigReader.parameter`` does.

For a per-model parameter and one expert: the expert's own ``models[].parameters`` setting,
evaluated for this tensor; if it is absent or no conditional entry matches, the top-level
``parameters`` setting; if that gives nothing too, the method's default. A global parameter
reads only the top-level ``parameters`` (mergekit ignores global ones set per model; the
loader rejects them). The result goes through :meth:`MethodSpec.resolve`, which validates it.
"""

from __future__ import annotations

from typing import Any

from modelalloy.recipe.model import Recipe, evaluate_setting, layer_position


def resolve_tensor_params(recipe: Recipe, tensor_name: str, layer_index: int | None,
                          num_layers: int | None) -> dict[str, Any]:
    """The method's parameters for one tensor: per-model ones as lists (expert order), global
    ones as scalars, defaults filled in and every value checked.

    ``layer_index``/``num_layers`` come from :class:`modelalloy.plan.layers.LayerIndexer`;
    gradients are evaluated at ``t = layer_index / (num_layers - 1)`` (1 for a one-layer
    stack) and at ``t = 0`` for tensors outside the layer stack (``layer_index=None``).
    """
    spec = recipe.method_spec()
    t = layer_position(layer_index, num_layers)
    experts = recipe.expert_entries()
    given: dict[str, Any] = {}
    for param in spec.params:
        top = recipe.parameters.get(param.name)
        top_value = None if top is None else evaluate_setting(tensor_name, top, t)
        if not param.per_model:
            if top_value is not None:
                given[param.name] = top_value
            continue
        values = []
        for entry in experts:
            own = entry.parameters.get(param.name)
            v = None if own is None else evaluate_setting(tensor_name, own, t)
            values.append(v if v is not None else top_value)
        if any(v is not None for v in values):
            default = param.default_for(recipe.conventions)
            given[param.name] = [default if v is None else v for v in values]
    where = f"{recipe.source}: tensor {tensor_name}"
    return spec.resolve(len(experts), given, where, recipe.conventions)
