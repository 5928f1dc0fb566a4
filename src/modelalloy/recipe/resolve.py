"""Per-tensor parameter values, resolved the way mergekit's ``ConfigReader.parameter`` does.

For a per-model parameter and one expert: the expert's own ``models[].parameters`` setting,
evaluated for this tensor; if it is absent or no conditional entry matches, the top-level
``parameters`` setting; if that gives nothing too, the method's default. A global parameter
reads only the top-level ``parameters`` (mergekit ignores global ones set per model; the
loader rejects them). The result goes through :meth:`MethodSpec.resolve`, which validates it.
"""

from __future__ import annotations

from typing import Any

from modelalloy.recipe.model import (
    Recipe,
    SliceSource,
    SliceSpec,
    evaluate_setting,
    layer_position,
)


def resolve_tensor_params(recipe: Recipe, tensor_name: str, layer_index: int | None,
                          num_layers: int | None,
                          slice_at: tuple[int, float] | None = None) -> dict[str, Any]:
    """The method's parameters for one tensor: per-model ones as lists (expert order), global
    ones as scalars, defaults filled in and every value checked.

    ``layer_index``/``num_layers`` come from :class:`modelalloy.plan.layers.LayerIndexer`;
    gradients are evaluated at ``t = layer_index / (num_layers - 1)`` (1 for a one-layer
    stack) and at ``t = 0`` for tensors outside the layer stack (``layer_index=None``).

    With ``slices:``, ``slice_at`` = (slice index, t) of the output tensor (mergekit's t runs
    over each slice's own layers): a per-model value comes from the slice's source for that
    model, then the slice's ``parameters``, then its module's (``modules:``), then the top
    level; a global one from the slice's ``parameters``, its module's, then the top level.
    """
    spec = recipe.method_spec()
    if slice_at is None:
        t = layer_position(layer_index, num_layers)
        per_model = [[e.parameters] for e in recipe.expert_entries()]
        shared = [recipe.parameters]
    else:
        index, t = slice_at
        assert recipe.slices is not None  # slice_at is given for slices recipes only
        sl = recipe.slices[index]
        per_model = [[s.parameters] for s in slice_experts(recipe, sl)]
        module = (recipe.modules or {}).get(sl.module or "")
        shared = [sl.parameters] + ([module.parameters] if module else []) \
            + [recipe.parameters]
    given: dict[str, Any] = {}
    for param in spec.params:
        top_value = _first(tensor_name, [level.get(param.name) for level in shared], t)
        if not param.per_model:
            if top_value is not None:
                given[param.name] = top_value
            continue
        values = []
        for levels in per_model:
            v = _first(tensor_name, [level.get(param.name) for level in levels], t)
            values.append(v if v is not None else top_value)
        if any(v is not None for v in values):
            default = param.default_for(recipe.conventions)
            given[param.name] = [default if v is None else v for v in values]
    where = f"{recipe.source}: tensor {tensor_name}"
    return spec.resolve(len(per_model), given, where, recipe.conventions)


def slice_experts(recipe: Recipe, sl: SliceSpec) -> list[SliceSource]:
    """A slice's sources that the method merges as models: all but the base, when the method
    uses one."""
    base = recipe.base_model
    if base is None or not recipe.uses_base():
        return list(sl.sources)
    return [s for s in sl.sources if not recipe.same_model(s.model, base)]


def _first(tensor_name: str, settings: list[Any], t: float) -> Any:
    """The first setting that gives a value for this tensor (None: none does)."""
    for setting in settings:
        if setting is not None:
            value = evaluate_setting(tensor_name, setting, t)
            if value is not None:
                return value
    return None
