"""One candidate merge, in memory: the single place where every optimizer turns a recipe into
weights.

Each float tensor gets the parameters the engine's planner would give it
(:func:`modelalloy.recipe.resolve.resolve_tensor_params` with the same layer indexing), the
tensors that share a parameter set are merged together by
:func:`modelalloy.merge_state_dicts`, and the result is cast to the recipe's output dtype, as
``modelalloy merge`` writes it; integer tensors are copied from the reference model. So the
candidate is, bit for bit, what ``modelalloy merge`` makes of the same recipe
(tests/optimize/test_interface.py checks it) — for the elementwise and per-tensor methods the
searches use (linear, task arithmetic, TIES, DARE-TIES): methods with whole-model statistics
(TIES ``scope: global``) or layer-position rules would see only their group here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from modelalloy.recipe.model import DTYPES, Recipe

StateDict = Mapping[str, torch.Tensor]


class ModelPool:
    """The state dicts of the models recipes name, each read once (by resolved folder).

    Between candidates it keeps the float32 copies of the source tensors (made on first use,
    4 bytes per parameter and model: a bf16 model is upcast once, not once per candidate) and
    the last candidate's merged tensors by parameter group, so a group whose parameters did not
    change is not merged again (``reuse``; a search that moves one layer group re-merges only
    that group).
    """

    def __init__(self, state_dicts: Mapping[str, StateDict] | None = None, *,
                 reuse: bool = True) -> None:
        self._loaded: dict[str, StateDict] = dict(state_dicts or {})
        self._f32: dict[tuple[int, str], torch.Tensor] = {}
        self.reuse = reuse
        self.last: dict[tuple, dict[str, torch.Tensor]] = {}
        self.merged_groups = self.reused_groups = 0

    def float32(self, sd: StateDict, name: str) -> torch.Tensor:
        t = sd[name]
        if t.dtype == torch.float32:
            return t
        key = (id(sd), name)
        if key not in self._f32:
            self._f32[key] = t.to(torch.float32)
        return self._f32[key]

    def get(self, recipe: Recipe, model: str) -> StateDict:
        key = str(recipe.model_path(model))
        if key not in self._loaded:
            self._loaded[key] = load_state_dict(Path(key))
        return self._loaded[key]

    def sources(self, recipe: Recipe) -> tuple[StateDict | None, list[StateDict]]:
        """(base or None, experts in recipe order) as the recipe's method takes them."""
        base = self.get(recipe, recipe.base_model) if recipe.uses_base() else None
        return base, [self.get(recipe, e.model) for e in recipe.expert_entries()]

    def items(self) -> list[tuple[str, StateDict]]:
        return list(self._loaded.items())


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, through the validated reader (no pickle code)."""
    from modelalloy.io.checkpoint import open_checkpoint

    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.names()}


def _key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def merge_candidate(recipe: Recipe, pool: ModelPool) -> dict[str, torch.Tensor]:
    """The merged state dict of ``recipe`` (see the module docstring)."""
    from modelalloy.api import merge_state_dicts
    from modelalloy.plan.layers import LayerIndexer
    from modelalloy.recipe.resolve import resolve_tensor_params

    base, experts = pool.sources(recipe)
    reference = base if base is not None else experts[0]
    indexer = LayerIndexer(reference.keys())
    groups: dict[tuple, tuple[dict[str, Any], list[str]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in reference.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        layer, count = indexer.lookup(name)
        params = resolve_tensor_params(recipe, name, layer, count)
        groups.setdefault(_key(params), (params, []))[1].append(name)
    dtype = getattr(torch, DTYPES[recipe.output_dtype]) if recipe.output_dtype else None

    def f32(sd: StateDict, names: list[str]) -> dict[str, torch.Tensor]:
        # float32 in, so the float32 result comes back and is cast once, as the engine does
        return {n: pool.float32(sd, n) for n in names}

    sources = (recipe.merge_method, recipe.seed, id(base), tuple(id(sd) for sd in experts),
               dtype)
    current: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, (params, names) in groups.items():
        group_key = (sources, key, tuple(names))
        merged = pool.last.get(group_key) if pool.reuse else None
        if merged is None:
            result = merge_state_dicts(
                recipe.merge_method, None if base is None else f32(base, names),
                [f32(sd, names) for sd in experts], seed=recipe.seed, **params)
            merged = {n: result[n].to(dtype or reference[n].dtype) for n in names}
            pool.merged_groups += 1
        else:
            pool.reused_groups += 1
        current[group_key] = merged
        out.update(merged)
    if pool.reuse:
        pool.last = current
    return {n: out[n] for n in reference}
