"""The shared expert θ* of Twin-Merging: a static merge of every expert.

The one place Twin-Merging merges weights, so that moving to the in-memory executor is one edit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modelalloy.errors import MethodError, RecipeError

SHARED_METHODS = ("task_arithmetic", "ties")
# Our suites' static rows use these (docs/benchmarks.md); the paper's RoBERTa runs use TA λ=0.29.
SHARED_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0},
}


def shared_expert(method: str, base: Mapping[str, torch.Tensor],
                  experts: Sequence[Mapping[str, torch.Tensor]],
                  params: Mapping[str, Any] | None = None, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """θ* = TA or TIES of the experts over ``base`` (the paper's shared expert), merged in
    memory by the one executor (``modelalloy.merge`` with ``sources``). ``params`` are global
    scalars or, for per-model parameters, one value per expert."""
    if method not in SHARED_METHODS:
        raise MethodError(f"twin_merging: the shared expert is one of "
                          f"{', '.join(SHARED_METHODS)}, got '{method}'")
    from modelalloy.api import merge

    given = {**SHARED_DEFAULTS[method], **dict(params or {})}
    names = [f"expert{k}" for k in range(len(experts))]
    per_model = {k: v for k, v in given.items() if isinstance(v, (list, tuple))}
    recipe = {"merge_method": method, "base_model": "base", "seed": seed,
              "models": [{"model": n, "parameters": {k: v[i] for k, v in per_model.items()}}
                         for i, n in enumerate(names)],
              "parameters": {k: v for k, v in given.items() if k not in per_model}}
    return merge(recipe, sources={"base": base, **dict(zip(names, experts, strict=True))})


def recipe_params(recipe: Any) -> dict[str, Any]:
    """A recipe's parameters as merge_state_dicts takes them: global scalars, per-model
    lists (plain numbers only: no gradients or filters)."""
    out: dict[str, Any] = {}
    for key, value in recipe.parameters.items():
        if not isinstance(value, (int, float, bool)):
            raise RecipeError(f"{recipe.source}: parameters.{key}: this command takes plain "
                              "numbers (no gradients or filters)")
        out[key] = value
    entries = recipe.expert_entries()
    keys = {k for e in entries for k in e.parameters}
    for key in sorted(keys):
        values = [e.parameters.get(key) for e in entries]
        if any(not isinstance(v, (int, float)) for v in values):
            raise RecipeError(f"{recipe.source}: models[].parameters.{key}: give a number for "
                              "every model (this command takes no gradients or filters)")
        out[key] = values
    return out
