"""A recipe whose models are all LoRA adapters of one base, merged into one adapter.

``modelalloy merge RECIPE OUT`` writes the merged adapter by itself when every model of the
recipe is ``base+adapter`` of one base, there are at least two, and the method has an
adapter form (one ``base+adapter`` alone is the adapter baked into its model, as mergekit)
(:func:`detect_adapter_recipe`; ``--as-adapter`` insists, ``--no-as-adapter`` merges full
models). The recipe's method becomes peft's combination on the factors
(:mod:`modelalloy.lora.combine`):

| recipe method     | combination  | adapter weights                 |
| ----------------- | ------------ | ------------------------------- |
| linear            | linear       | w_i / Σ w (w_i when normalize: false) |
| task_arithmetic   | linear       | λ · w_i                         |
| ties              | ties         | λ · w_i, one density for all    |
| dare_linear       | dare_linear  | λ · w_i, one density for all    |
| dare_ties         | dare_ties    | λ · w_i, one density for all    |

Parameters must be plain values (no gradients or filters: an adapter is merged whole). For
ties and DARE, peft's disjoint mean over the agreeing entries stands for ``normalize``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelalloy.errors import AdapterError
from modelalloy.lora.combine import merge_adapters
from modelalloy.recipe import Recipe, load_recipe, resolve_tensor_params

METHODS = {"linear": "linear", "task_arithmetic": "linear", "ties": "ties",
           "dare_linear": "dare_linear", "dare_ties": "dare_ties"}


@dataclass(frozen=True)
class Detection:
    """What ``merge`` found in a recipe: write an adapter, or full models and why."""
    as_adapter: bool
    line: str  # one line for the user ("" when no model is an adapter)


def detect_adapter_recipe(recipe: Recipe) -> Detection:
    """Whether ``recipe`` is all adapters of one base that merge as an adapter."""
    entries = recipe.expert_entries()
    split = [recipe.split_adapter(e.model)[1] is not None for e in entries]
    if not any(split) or len(split) == 1:  # one model+adapter: baked into its model
        return Detection(False, "")
    if not all(split):  # adapters applied as they are read: the merge as ever, nothing to say
        return Detection(False, "")
    try:
        _adapter_merge(recipe)
    except AdapterError as e:
        reason = str(e).removeprefix(f"{recipe.source}: ")
        return Detection(False, f"every model is a LoRA adapter, but {reason.rstrip('.')}: "
                                "merging full models")
    return Detection(True, f"every model is a LoRA adapter of one base: writing the merged "
                           f"PEFT adapter ('{METHODS[recipe.merge_method]}'); "
                           "as_adapter=False merges full models")


def adapter_choice(recipe: str | Path | Recipe, asked: bool | None,
                   say: Callable[[str], object]) -> tuple[bool, Recipe]:
    """``merge``'s choice: ``asked`` (--as-adapter/--no-as-adapter) or what the recipe is;
    ``say`` gets the one line of what was detected."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if asked is not None:
        return asked, recipe
    found = detect_adapter_recipe(recipe)
    if found.line:
        say(found.line)
    return found.as_adapter, recipe


def merge_recipe_adapters(recipe: str | Path | Recipe, out: Path, *, force: bool = False,
                          seed: int | None = None) -> Path:
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    kind, adapters, weights, density = _adapter_merge(recipe)
    return merge_adapters(adapters, weights, Path(out), kind, density=density,
                          seed=recipe.seed if seed is None else seed, force=force)


def _adapter_merge(recipe: Recipe) -> tuple[str, list[Path], list[float], float]:
    """(combination, adapter folders, weights, density), or a one-line AdapterError."""
    kind = METHODS.get(recipe.merge_method)
    if kind is None:
        raise AdapterError(f"{recipe.source}: merge_method '{recipe.merge_method}' has no "
                           f"adapter form; use one of {', '.join(METHODS)} (or "
                           "`modelalloy merge-adapters` for cat, svd, magnitude_prune)")
    entries = recipe.expert_entries()
    bases, adapters = set(), []
    for e in entries:
        model, adapter = recipe.split_adapter(e.model)
        if adapter is None:
            raise AdapterError(f"{recipe.source}: model '{e.model}' is not an adapter; every "
                               "model must be base+adapter to merge them as an adapter")
        bases.add(recipe.model_path(model))
        adapters.append(recipe.adapter_path(e.model))
    if recipe.base_model is not None:
        bases.add(recipe.model_path(recipe.base_model))
    if len(bases) != 1:
        raise AdapterError(f"{recipe.source}: the adapters are of {len(bases)} different "
                           "models; merging as an adapter needs adapters of one base")
    for params in [recipe.parameters, *(e.parameters for e in entries)]:
        for key, value in params.items():
            if isinstance(value, list):
                raise AdapterError(f"{recipe.source}: parameter '{key}' is a gradient or a "
                                   "filtered list; an adapter is merged whole, give a value")
    # the method's own defaults, resolved as for any tensor (the values are plain)
    params = resolve_tensor_params(recipe, "adapter", None, None)
    weights = [float(w) for w in params.get("weight", [1.0] * len(entries))]
    if recipe.merge_method == "linear" and params.get("normalize", True):
        weights = [w / sum(weights) for w in weights]
    elif recipe.merge_method != "linear":
        weights = [float(params.get("lambda", 1.0)) * w for w in weights]
    density = 1.0
    if kind != "linear":
        densities = set(params.get("density", [1.0]))
        if len(densities) != 1:
            raise AdapterError(f"{recipe.source}: peft's {kind} takes one density for all "
                               f"adapters, got {sorted(densities)}")
        density = float(densities.pop())
    return kind, adapters, weights, density
