"""One candidate merge, in memory: the single place where every optimizer turns a recipe into
weights.

It is the engine's in-memory path, ``modelalloy.merge(recipe, sources=...)``: the same
planner, per-tensor parameters (filters, gradients), checks, seeds, sliced and fused kernels
as ``modelalloy merge``, with the models held in memory by a :class:`ModelPool` instead of read
from their folders. So a candidate is, bit for bit, what ``modelalloy merge`` writes for the same
recipe (tests/optimize/test_interface.py and test_learners.py check it), and nothing is written
to disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modelalloy.recipe.model import Recipe

StateDict = Mapping[str, torch.Tensor]


class ModelPool:
    """The state dicts of the models recipes name, each read once (by resolved folder).

    ``threads``: the engine's merge threads per candidate (None: its default; Ray workers use
    one each).
    """

    def __init__(self, state_dicts: Mapping[str, StateDict] | None = None, *,
                 threads: int | None = None) -> None:
        self._loaded: dict[str, StateDict] = dict(state_dicts or {})
        self.threads = threads

    def get(self, recipe: Recipe, model: str) -> StateDict:
        key = str(recipe.model_path(model))
        if key not in self._loaded:
            self._loaded[key] = load_state_dict(Path(key))
        return self._loaded[key]

    def sources(self, recipe: Recipe) -> tuple[StateDict | None, list[StateDict]]:
        """(base or None, experts in recipe order) as the recipe's method takes them."""
        base = self.get(recipe, recipe.base_model) if recipe.uses_base() else None
        return base, [self.get(recipe, e.model) for e in recipe.expert_entries()]

    def by_reference(self, recipe: Recipe) -> dict[str, StateDict]:
        """Every model of the recipe, keyed by the reference the recipe writes."""
        return {m: self.get(recipe, m) for m in recipe.all_models()}

    def items(self) -> list[tuple[str, StateDict]]:
        return list(self._loaded.items())


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, through the validated reader (no pickle code)."""
    from modelalloy.io.checkpoint import open_checkpoint

    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.names()}


def merge_candidate(recipe: Recipe, pool: ModelPool, *,
                    stats: Mapping[str, Sequence[StateDict]] | None = None,
                    into: torch.nn.Module | None = None) -> Any:
    """The merged state dict of ``recipe`` (or ``into``, filled in place); ``stats``: per
    statistic kind, one mapping per expert (data-informed methods, e.g. ``merge_coeffs``)."""
    from modelalloy.api import merge

    options: dict[str, Any] = {}
    if pool.threads is not None:
        options["threads"] = pool.threads
    if stats is not None:
        options["stats"] = dict(stats)
    return merge(recipe, sources=pool.by_reference(recipe), into=into, **options)
