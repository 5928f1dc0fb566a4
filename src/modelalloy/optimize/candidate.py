"""One candidate merge, in memory: the single place where every optimizer turns a recipe into
weights.

It is the engine's in-memory path, ``modelalloy.merge(recipe, sources=...)``: the same
planner, per-tensor parameters (filters, gradients), checks, seeds, sliced and fused kernels
as ``modelalloy merge``, with the models held in memory by a :class:`ModelPool` instead of read
from their folders. So a candidate is, bit for bit, what ``modelalloy merge`` writes for the same
recipe (tests/optimize/test_interface.py and test_learners.py check it), and nothing is written
to disk.

A search trial merges straight into a live module (:func:`merge_into`, :class:`LiveModel`):
the merged tensors are written into its parameters in place, and the module remembers which
candidate parameters each tensor holds, so the next candidate writes only the tensors that
changed (the same rule as the state-dict cache below). No model is built per trial and no
whole-model copy is made.

Between candidates the pool keeps the merged tensors with the parameters they were merged
with; the next candidate re-merges only the tensors whose parameters changed (a search that
moves one layer group re-merges that group), where that gives the same bits: methods whose
output for a tensor depends only on that tensor's inputs, parameters, seed and name
(:data:`POSITION_FREE`), no whole-model pass, and no gradient (layer-position) settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from modelalloy.errors import OptimizeError
from modelalloy.recipe.model import Recipe

StateDict = Mapping[str, torch.Tensor]
Shapes = Mapping[str, tuple[int, ...]]
# Methods whose merged tensor depends only on its own inputs, parameters, seed and name (not on
# its layer position nor on other tensors), for which re-merging a subset is exact.
POSITION_FREE = frozenset({"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                           "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"})


class ModelPool:
    """The state dicts of the models recipes name, each read once (by resolved folder).

    ``threads``: the engine's merge threads per candidate (None: its default; Ray workers use
    one each).
    """

    def __init__(self, state_dicts: Mapping[str, StateDict] | None = None, *,
                 threads: int | None = None, reuse: bool = True) -> None:
        self._loaded: dict[str, StateDict] = dict(state_dicts or {})
        self.threads = threads
        self.reuse = reuse
        self.last: dict[str, tuple[Any, torch.Tensor]] = {}  # name -> (its key, merged)
        self.merged_tensors = self.reused_tensors = 0
        self._stages: dict[str, ModelPool] = {}

    def get(self, recipe: Recipe, model: str) -> StateDict:
        key = recipe.model_reference(model)  # two tasks of one bundle are two models
        if key not in self._loaded:
            from modelalloy.engine.run import open_recipe_model

            # as the engine opens it: a bundle's expert rebuilt, an adapter applied
            with open_recipe_model(recipe, model) as src:
                self._loaded[key] = {n: src.get(n) for n in src.names()}
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

    def stage(self, name: str) -> ModelPool:
        """A pool over the same models with its own re-merge cache (one per stage of a
        staged candidate)."""
        if name not in self._stages:
            sub = ModelPool(threads=self.threads, reuse=self.reuse)
            sub._loaded = self._loaded  # shared: every model is still read once
            self._stages[name] = sub
        return self._stages[name]


def merge_candidate(recipe: Recipe, pool: ModelPool, *,
                    stats: Mapping[str, Sequence[StateDict]] | None = None,
                    into: torch.nn.Module | None = None) -> Any:
    """The merged state dict of ``recipe`` (or ``into``, filled in place); ``stats``: per
    statistic kind, one mapping per expert (data-informed methods, e.g. ``merge_coeffs``)."""
    from modelalloy.api import merge

    options = _options(pool)
    if stats is not None:
        options["stats"] = dict(stats)
    sources = pool.by_reference(recipe)
    keys = _tensor_keys(recipe, pool) if pool.reuse and into is None and stats is None else None
    if keys is None:
        return merge(recipe, sources=sources, into=into, **options)
    changed = [n for n, k in keys.items() if n not in pool.last or pool.last[n][0] != k]
    if changed:
        subset = {ref: {n: sd[n] for n in changed} for ref, sd in sources.items()}
        merged = merge(recipe, sources=subset, **options)
        pool.last.update({n: (keys[n], merged[n]) for n in changed})
    pool.merged_tensors += len(changed)
    pool.reused_tensors += len(keys) - len(changed)
    # integer and bool tensors: copied from the reference, as the engine does
    return {n: pool.last[n][1] if n in keys else t.clone()
            for n, t in _reference(recipe, pool).items()}


def merge_staged(staged: Any, pool: ModelPool, live: LiveFor | None = None) -> Any:
    """A :class:`modelalloy.optimize.space.StagedRecipe` in memory: each stage merged from the
    pool, then the final recipe from the stages' state dicts — the computations, and so the
    bits, of ``modelalloy merge-multi`` on the same stages. Each stage keeps its own
    re-merge cache (a search that moves one cell re-merges it in the stages concerned).
    Returns the final state dict, or with ``live`` the live module it was written into."""
    from modelalloy.api import merge

    outputs: dict[str, StateDict] = {}
    for name, recipe in staged.stages:
        outputs[name] = merge_candidate(recipe, pool.stage(name))
    # the final may name source models besides the stages (PS then DFS: a path through the
    # PS merge and the experts)
    sources = {m: outputs[m] if m in outputs else pool.get(staged.final, m)
               for m in staged.final.all_models()}
    merged = merge(staged.final, sources=sources, **_options(pool))
    return merged if live is None else _load(live, merged)


class LiveModel:
    """A module that candidates are merged into, in place, and which candidate parameters
    (re-merge key) each of its tensors holds now.

    ``check(shapes, module)``: the evaluator's own test that a candidate's tensors fit the
    module (raises its one-line error); besides it, every candidate tensor must be one of the
    module's, of the same shape. Tied tensors (GPT-2's ``lm_head`` is ``wte``) are one
    parameter: writing one writes both.
    """

    def __init__(self, module: torch.nn.Module,
                 check: Callable[[Shapes, torch.nn.Module], None] | None = None) -> None:
        self.module = module
        self.check = check
        self.targets: dict[str, torch.Tensor] = dict(module.state_dict(keep_vars=True))
        self.holds: dict[str, Any] = {}  # name -> the key of the candidate that wrote it
        self._fits: dict[str, tuple[int, ...]] | None = None  # the layout checked last
        # names that share their storage with others (tied): writing one changes them all
        by_storage: dict[int, list[str]] = {}
        for name, t in self.targets.items():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
        self.tied = {n: [m for m in group if m != n] for group in by_storage.values()
                     if len(group) > 1 for n in group}

    def fit(self, shapes: Shapes) -> None:
        """Fail in one line unless tensors of ``shapes`` can be written into the module."""
        if self._fits == shapes:
            return
        if self.check is not None:
            self.check(shapes, self.module)
        kind = type(self.module).__name__
        for name, shape in shapes.items():
            if name not in self.targets:
                raise OptimizeError(f"the candidate has tensor '{name}' that the {kind} "
                                    "scoring it does not have")
            if tuple(self.targets[name].shape) != tuple(shape):
                raise OptimizeError(f"the candidate's tensor '{name}' is {list(shape)}, the "
                                    f"{kind} scoring it has {list(self.targets[name].shape)}")
        self._fits = {n: tuple(s) for n, s in shapes.items()}

    def view(self, names: Iterable[str]) -> torch.nn.Module:
        """Some of the module's tensors as the engine's ``into=`` takes a module."""
        return _Tensors({n: self.targets[n] for n in names})

    def forget(self) -> None:
        self.holds.clear()


# The live model of a candidate's tensor layout (names and shapes): one per depth.
LiveFor = Callable[[Shapes], LiveModel]


class _Tensors(torch.nn.Module):
    """A set of tensors of another module, seen through ``state_dict`` (all the engine's
    module sink reads); they are written in place."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return dict(self.tensors)


def merge_into(recipe: Recipe, pool: ModelPool, live: LiveFor) -> torch.nn.Module:
    """:func:`merge_candidate` written into the live module of its layout, in place; only the
    tensors whose key differs from what the module holds are merged and written (where
    re-merging a subset is exact; otherwise the whole candidate). Returns the module."""
    from modelalloy.api import merge

    sources = pool.by_reference(recipe)
    if recipe.slices:  # the layout is the slices' (a data-flow path): known once merged
        return _load(live, merge(recipe, sources=sources, **_options(pool)))
    reference = _reference(recipe, pool)
    model = live({n: tuple(t.shape) for n, t in reference.items()})
    keys = _tensor_keys(recipe, pool) if pool.reuse else None
    if keys is None:
        model.forget()
        merge(recipe, sources=sources, into=model.view(reference), **_options(pool))
        return model.module
    # integer and bool tensors: the engine copies them from the reference model
    ref = recipe.model_reference(recipe.base_model if recipe.uses_base()  # type: ignore[arg-type]
                                 else recipe.expert_entries()[0].model)
    keys.update({n: ("copy", ref) for n in reference if n not in keys})
    stale = {n for n, k in keys.items() if model.holds.get(n) != k}
    # a tied tensor written again overwrites its twins: they are written too, in plan order
    stale |= {m for n in stale for m in model.tied.get(n, ())}
    changed = [n for n in keys if n in stale]
    if changed:
        for n in changed:  # a merge that fails half-way leaves them unknown
            model.holds.pop(n, None)
        subset = {r: {n: sd[n] for n in changed} for r, sd in sources.items()}
        merge(recipe, sources=subset, into=model.view(changed), **_options(pool))
        model.holds.update({n: keys[n] for n in changed})
    pool.merged_tensors += len(changed)
    pool.reused_tensors += len(keys) - len(changed)
    return model.module


def _load(live: LiveFor, merged: StateDict) -> torch.nn.Module:
    """A merged state dict copied into the live module of its layout."""
    model = live({n: tuple(t.shape) for n, t in merged.items()})
    model.forget()
    with torch.no_grad():
        for name, tensor in merged.items():
            model.targets[name].copy_(tensor)
    return model.module


def _options(pool: ModelPool) -> dict[str, Any]:
    return {} if pool.threads is None else {"threads": pool.threads}


def _reference(recipe: Recipe, pool: ModelPool) -> StateDict:
    base, experts = pool.sources(recipe)
    return base if base is not None else experts[0]


def _has_gradient(setting: Any) -> bool:
    """A list of numbers (interpolated over the layer position) anywhere in a setting."""
    from modelalloy.recipe.model import Conditional, is_number

    if isinstance(setting, Conditional):
        return _has_gradient(setting.value)
    if isinstance(setting, list):
        return (len(setting) > 1 and all(is_number(v) for v in setting)) or any(
            _has_gradient(v) for v in setting if isinstance(v, (list, Conditional)))
    return False


def _tensor_keys(recipe: Recipe, pool: ModelPool) -> dict[str, Any] | None:
    """Per float tensor, what its merged value depends on (method, seed, dtype, models, its
    resolved parameters); None when re-merging a subset would not be exact."""
    from modelalloy.plan.layers import LayerIndexer
    from modelalloy.recipe.resolve import resolve_tensor_params

    spec = recipe.method_spec()
    if spec.name not in POSITION_FREE:
        return None
    settings = [*recipe.parameters.values()] + [v for e in recipe.models
                                                for v in e.parameters.values()]
    if any(_has_gradient(v) for v in settings):
        return None
    reference = _reference(recipe, pool)
    indexer = LayerIndexer(reference.keys())
    common = (spec.name, recipe.seed, recipe.out_dtype or recipe.dtype,
              tuple(recipe.model_reference(m) for m in recipe.all_models()),
              recipe.uses_base())
    keys: dict[str, Any] = {}
    for name, tensor in reference.items():
        if not tensor.is_floating_point():
            continue
        params = resolve_tensor_params(recipe, name, *indexer.lookup(name))
        if spec.execution.prepare_for(params) is not None:
            return None  # a whole-model pass: every tensor depends on all the others
        keys[name] = (common, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                           for k, v in params.items())))
    return keys
