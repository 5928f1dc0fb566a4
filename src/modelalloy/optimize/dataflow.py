"""The data-flow space of ``evolve`` (Akiba et al., "Evolutionary Optimization of Model Merging
Recipes", Nature Machine Intelligence 2025, §3.2 "Merging in the data flow space"): which layers
of the sources an input goes through, in which order, and how much each layer's input is scaled.

The sources' layers are laid end to end, model after model, M layers in all, and that list is
repeated r times (``repeats``): T = r·M slots. The genome is

    I ∈ [0, 1]^T        slot t is on the path when I_t > 0.5 (the paper's I_t > 0 in unit
                         coordinates); a genome with no slot on keeps its largest one
    W ∈ [lo, hi]^{M×M}  W_ij scales the input of layer j when the path reaches it from layer i
                         (the first layer of the path reads the embeddings unscaled)

so the path is the on-slots in order, layer ``t mod M`` each, and its p-th layer j is entered
with the factor W_{i j}, i the layer before it. A path is a plain recipe: ``passthrough`` with
one ``slices:`` entry per layer (``layer_range: [l, l + 1]`` of its model), which
``modelalloy merge`` runs as any frankenmerge; the tensors outside the stack come from the first
slice's model (embeddings) and the last slice's (final norm, head), as for every ``slices:``
recipe. The factor is the slice's passthrough ``scale`` on the layer's tensors whose name
holds a ``scale_filter`` substring (default ``weight``): for a layer linear in its input
(y = W x + b) scaling the weight is scaling the input, as the paper does in the data flow;
for a pre-norm transformer layer, whose norm absorbs an input scale, name the tensors to scale
(e.g. ``o_proj``, ``down_proj``: the layer's contribution to the residual stream).

The start point is the first model's own path (its layers in order, every factor 1). PS then
DFS, as the paper combines them, is :mod:`modelalloy.optimize.hybrid` (``space: ps+dfs``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelalloy.errors import OptimizeError
from modelalloy.optimize.genes import Bound, Gene
from modelalloy.plan.layers import split_layer
from modelalloy.recipe.model import Conditional, Recipe, evaluate_setting

DATAFLOW_KEYS = ("space", "repeats", "scale", "scale_filter")
# template keys a path recipe keeps (the rest describe the merge the path replaces)
_KEPT = ("dtype", "out_dtype", "seed", "name", "conventions")


@dataclass(frozen=True)
class Layout:
    """One model's layer stack: its prefix, its layers (raw indices, in order), and per layer
    the tensor names within it (after ``prefix.index``)."""

    prefix: str
    layers: list[int]
    rests: dict[int, list[str]]
    outside: list[str]


def layout_of(names: Sequence[str], where: str) -> Layout:
    stacks: dict[str, dict[int, list[str]]] = {}
    outside = []
    for n in names:
        found = split_layer(n)
        if found is None:
            outside.append(n)
            continue
        prefix, raw = found
        rest = n[len(prefix) + bool(prefix) + len(str(raw)):]
        stacks.setdefault(prefix, {}).setdefault(raw, []).append(rest)
    if len(stacks) != 1:
        raise OptimizeError(f"{where}: the data-flow space needs models with one layer stack, "
                            f"found {len(stacks)} ({', '.join(sorted(stacks)) or 'none'})")
    prefix, layers = next(iter(stacks.items()))
    return Layout(prefix, sorted(layers), {k: layers[k] for k in sorted(layers)}, outside)


@dataclass
class DataflowSpace:
    """Slots, genes and the path recipe they give (see the module docstring)."""

    template: dict[str, Any]
    source: str
    base_dir: Path
    models: list[str]                    # the sources, template order
    layouts: list[Layout]
    repeats: int
    scale: Bound | None                  # None: no scaling genes (every factor 1)
    scale_filter: list[str]
    granularity: str = "dataflow"
    filters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the M layers in order: (model, position in its stack)
        self.layers = [(k, p) for k, lay in enumerate(self.layouts)
                       for p in range(len(lay.layers))]
        self.cells = [f"{Path(self.models[k]).name}:{self.layouts[k].layers[p]}"
                      for k, p in self.layers]
        self.filters = list(self.scale_filter)
        m = len(self.layers)
        self.genes = [Gene("path", t, None) for t in range(self.repeats * m)]
        if self.scale is not None:
            self.genes += [Gene("scale", i * m + j, None) for i in range(m) for j in range(m)]

    # the driver's view of a space
    @property
    def layers_per_group(self) -> int:
        return self.repeats

    @property
    def bounds(self) -> list[Bound]:
        return [self.scale] if self.scale is not None else []

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def column_labels(self) -> list[str]:
        return self.cells

    def bound(self, name: str) -> Bound:
        if name == "scale" and self.scale is not None:
            return self.scale
        return Bound(name, 0.0, 1.0, 1.0, False)

    def x0(self) -> list[float]:
        """The first model's own path, every factor 1 (or the scale's ``init``)."""
        m = len(self.layers)
        start = [0.75 if t < m and self.layers[t][0] == 0 else 0.25
                 for t in range(self.repeats * m)]
        if self.scale is not None:
            start += [self.scale.unit(self.scale.init)] * (m * m)
        return start

    def path(self, genome: Sequence[float]) -> list[tuple[int, float]]:
        """The path: (layer index in 0..M−1, its input factor) per step."""
        if len(genome) != self.dim:
            raise OptimizeError(f"{self.source}: genome of {len(genome)} genes for a data-flow "
                                f"space of {self.dim}")
        m = len(self.layers)
        slots = self.repeats * m
        on = [t for t in range(slots) if genome[t] > 0.5]
        if not on:
            on = [max(range(slots), key=lambda t: (genome[t], -t))]
        steps: list[tuple[int, float]] = []
        for p, t in enumerate(on):
            j = t % m
            factor = 1.0
            if p > 0 and self.scale is not None:
                i = on[p - 1] % m
                factor = self.scale.value(genome[slots + i * m + j])
            steps.append((j, factor))
        return steps

    def table(self, genome: Sequence[float]) -> dict[str, list[list[float]]]:
        """W (layers × layers), the factor of each transition; NaN without scaling."""
        m = len(self.layers)
        slots = self.repeats * m
        if self.scale is None:
            return {}
        return {"scale": [[self.scale.value(genome[slots + i * m + j]) for j in range(m)]
                          for i in range(m)]}

    # -- genome -> recipe --------------------------------------------------------------------

    def recipe_dict(self, genome: Sequence[float], *, absolute: Mapping[str, str] | None = None,
                    name: str | None = None) -> dict[str, Any]:
        """A ``passthrough`` recipe with one slice per step of the path."""
        rename = dict(absolute or {})
        steps = self.path(genome)
        first_k = self.layers[steps[0][0]][0]
        last_k = self.layers[steps[-1][0]][0]
        prefix = self.layouts[first_k].prefix
        slices = []
        for o, (j, factor) in enumerate(steps):
            k, p = self.layers[j]
            lay = self.layouts[k]
            raw = lay.layers[p]
            outside = ([n for n in self.layouts[first_k].outside] if o == 0 else []) + (
                [n for n in self.layouts[last_k].outside] if o == len(steps) - 1 else [])
            src: dict[str, Any] = {"model": rename.get(self.models[k], self.models[k]),
                                   "layer_range": [p, p + 1]}
            setting = self._scale_setting_at(k, raw, f"{prefix}{'.' if prefix else ''}{o}",
                                             factor, outside)
            if setting is not None:
                src["parameters"] = {"scale": setting}
            slices.append({"sources": [src]})
        out = {k: copy.deepcopy(v) for k, v in self.template.items() if k in _KEPT}
        if name:
            out["name"] = name
        return {**out, "merge_method": "passthrough", "slices": slices}

    def _scale_setting_at(self, k: int, raw: int, base: str, factor: float,
                          outside: Sequence[str]) -> list[dict[str, Any]] | None:
        if factor == 1.0:
            return None
        target = {f"{base}{rest}": (factor if any(f in rest for f in self.scale_filter)
                                    else 1.0) for rest in self.layouts[k].rests[raw]}
        target.update({n: 1.0 for n in outside})
        scaled = sorted((n for n, v in target.items() if v != 1.0), key=lambda n: (-len(n), n))
        if not scaled:
            return None
        entries = [{"filter": n, "value": factor} for n in scaled] + [{"value": 1.0}]
        conds = [Conditional(**e) for e in entries]
        if not all(evaluate_setting(n, conds) == v for n, v in target.items()):
            raise OptimizeError(f"{self.source}: cannot scale the tensors of layer {base} "
                                "alone by name filters (a tensor name is part of another)")
        return entries

    def recipe(self, genome: Sequence[float], **kwargs: Any) -> Recipe:
        from modelalloy.recipe.load import recipe_from_dict

        return recipe_from_dict(self.recipe_dict(genome, **kwargs), source=self.source,
                                base_dir=self.base_dir)


def build_dataflow_space(recipe_data: Mapping[str, Any], search: Mapping[str, Any], *,
                         source: str, base_dir: Path,
                         names_of: Any) -> tuple[DataflowSpace, Recipe]:
    """The data-flow space of a template, and a recipe naming its sources (for their paths and
    the model pool). ``names_of(recipe, model)``: the tensor names of a model."""
    from modelalloy.recipe.load import recipe_from_dict

    unknown = [k for k in search if k not in DATAFLOW_KEYS]
    if unknown:
        raise OptimizeError(f"{source}: search.{unknown[0]}: not a key of the data-flow space; "
                            f"use {', '.join(DATAFLOW_KEYS)}")
    method = recipe_data.get("merge_method", "passthrough")
    if method != "passthrough":
        raise OptimizeError(f"{source}: search.space dataflow writes a passthrough path; set "
                            f"merge_method: passthrough (not '{method}')")
    raw_models = recipe_data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise OptimizeError(f"{source}: search.space dataflow: list the models whose layers "
                            "the path goes through under `models:`")
    models = [m if isinstance(m, str) else m.get("model") if isinstance(m, Mapping) else None
              for m in raw_models]
    if not all(isinstance(m, str) and m for m in models):
        raise OptimizeError(f"{source}: models: each entry is a folder or {{model: folder}}")
    holder = recipe_from_dict({"merge_method": "linear", "models": list(models)},
                              source=source, base_dir=base_dir)
    repeats, scale, scale_filter = flow_settings(search, source)
    layouts = [layout_of(names_of(holder, m), f"{source}: model '{m}'") for m in models]
    space = DataflowSpace(dict(recipe_data), source, base_dir, list(models), layouts, repeats,
                          scale, scale_filter)
    return space, holder


def flow_settings(search: Mapping[str, Any], source: str, where: str = "search"
                  ) -> tuple[int, Bound | None, list[str]]:
    """``repeats``, ``scale`` (None: no factors) and ``scale_filter`` of a data-flow block."""
    repeats = search.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise OptimizeError(f"{source}: {where}.repeats must be a whole number ≥ 1")
    scale_given = search.get("scale", [0.0, 2.0])
    scale = None
    if scale_given is not False:
        if not (isinstance(scale_given, (list, tuple)) and len(scale_given) == 2
                and all(isinstance(v, (int, float)) for v in scale_given)
                and 0 <= scale_given[0] <= 1.0 <= scale_given[1]):
            raise OptimizeError(f"{source}: {where}.scale: give [min, max] around 1 (e.g. "
                                "[0, 2]) or false for no scaling")
        scale = Bound("scale", float(scale_given[0]), float(scale_given[1]), 1.0, False)
    scale_filter = search.get("scale_filter", ["weight"])
    if not (isinstance(scale_filter, list) and scale_filter
            and all(isinstance(f, str) and f for f in scale_filter)):
        raise OptimizeError(f"{source}: {where}.scale_filter must be a list of name substrings")
    return repeats, scale, list(scale_filter)
