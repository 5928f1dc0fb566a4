"""`modelalloy merge-stream` through the one driver: models in arrival order as an OPCM recipe.

Continual merging (OPCM, :mod:`modelalloy.continual`) of a base and models given one after
another is the recipe method ``opcm`` over those models in that order: its whole-model pass
reads model t and the base tensor by tensor in pass t and keeps only the running merge, and
the engine writes θ_0 + that merge. So a stream gets what every merge gets: the planner's
checks (missing tensors, shapes), NaN/Inf inputs refused, the output-shape check, the writer's
atomic folder with the recipe and a model card, and the same bits as
:class:`modelalloy.continual.OPCM` over the same models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelalloy.continual import DEFAULT_EXCLUDE
from modelalloy.engine.run import MergeResult, run_recipe
from modelalloy.errors import PlanError
from modelalloy.recipe import Recipe, recipe_from_dict


@dataclass
class StreamResult:
    """A stream's merge, with OPCM's norms: ‖τ_t‖ per model in arrival order and ‖θ − θ_0‖."""

    merge: MergeResult
    task_norms: list[float] = field(default_factory=list)
    merged_norm: float = 0.0


def stream_recipe(base: str | Path, models: Sequence[str | Path], *, alpha: float = 0.5,
                  exclude: str = DEFAULT_EXCLUDE) -> Recipe:
    """The OPCM recipe of ``models`` arriving in this order over ``base``."""
    if not models:
        raise PlanError("merge_stream: give at least one model after the base")
    recipe = recipe_from_dict({
        "merge_method": "opcm", "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": {"alpha": alpha, "exclude": exclude, "shuffle": False}},
        source="merge_stream")
    experts = recipe.expert_entries()
    if len(experts) != len(models):  # the recipe drops a model that is the base itself
        dropped = next(str(m) for m in models if all(e.model != str(m) for e in experts))
        raise PlanError(f"merge_stream: model '{dropped}' is the base model itself (a zero "
                        "task vector); give the fine-tuned models only")
    return recipe


def merge_stream(base: str | Path, models: Sequence[str | Path], out_dir: str | Path, *,
                 alpha: float = 0.5, exclude: str = DEFAULT_EXCLUDE, device: str = "cpu",
                 threads: int | None = None, allow_nonfinite: bool = False,
                 force: bool = False) -> StreamResult:
    """Merge ``models`` (folders or weight files), arriving in this order, into ``base``
    with OPCM and write the merged model to ``out_dir`` (atomically), through the engine."""
    recipe = stream_recipe(base, models, alpha=alpha, exclude=exclude)
    found: dict[str, Any] = {}

    def prepared(stats: Any) -> None:
        found.update(stats or {})

    result = run_recipe(recipe, Path(out_dir), device=device, threads=threads, force=force,
                        allow_nonfinite=allow_nonfinite, prepared=prepared)
    delta = found.get("delta", {})
    # ‖θ^(T) − θ_0‖ in float64 over every merged tensor, as OPCM.add reports it
    merged = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
    return StreamResult(result, list(found.get("norms", [])), merged)
