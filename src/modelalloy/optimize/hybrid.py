"""``evolve`` in the parameter space, then in the data-flow space, in one run (Akiba et al.,
"Evolutionary Optimization of Model Merging Recipes", Nature Machine Intelligence 2025, §3.3
"Merging in both spaces": PS merging of the sources first, then "put back this merged model
into the collection of source models and apply DFS merging from this enlarged collection").

A template with ``search: {space: ps+dfs}`` holds the parameter-space keys (``granularity``,
``parameters``, ...: :mod:`modelalloy.optimize.space`) and a ``dataflow:`` block (``repeats``,
``scale``, ``scale_filter``: :mod:`modelalloy.optimize.dataflow`)::

    merge_method: task_arithmetic
    base_model: ./base
    models: [{model: ./a}, {model: ./b}]
    search:
      space: ps+dfs
      parameters: {weight: [0, 1]}
      dataflow: {repeats: 1, scale: false}

Phase 1 searches the parameter space (candidates: genomes of the template). Its best trial θ*
becomes the stage :data:`PS_STAGE`; phase 2 searches paths through the layers of
[θ*, expert 1, ..., expert K] (candidates: ``{"genome": path genome, "ps": θ*'s genome}``, so
every trial of the log says which PS merge it stands on). A phase-2 candidate is a two-stage
recipe — the PS recipe as the stage ``evolve_ps``, then the ``passthrough`` path that names
that stage among its models — mergekit-multi's format, which ``modelalloy merge-multi``
reproduces. The data-flow start point is θ*'s own path (its layers in order, factors 1), so
phase 2 starts from the PS result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelalloy.errors import OptimizeError
from modelalloy.optimize.dataflow import DataflowSpace, flow_settings, layout_of
from modelalloy.optimize.genes import Bound, check_keys
from modelalloy.optimize.space import SearchSpace, StagedRecipe, build_space
from modelalloy.recipe.model import Recipe

PS_STAGE = "evolve_ps"  # the stage name of the parameter-space merge in a phase-2 recipe
HYBRID_KEYS = ("repeats", "scale", "scale_filter")


@dataclass
class HybridSpace:
    """The parameter space and the data-flow space over its merge and the experts."""

    ps: SearchSpace
    flow: DataflowSpace
    algorithms = ("evolve",)   # the algorithms that search it
    name = "ps+dfs"

    # the driver's view (phase 1's space; phase 2 is told through the candidates)
    @property
    def template(self) -> dict[str, Any]:
        return self.ps.template

    @property
    def source(self) -> str:
        return self.ps.source

    @property
    def base_dir(self) -> Path:
        return self.ps.base_dir

    @property
    def granularity(self) -> str:
        return f"{self.ps.granularity}+dataflow"

    @property
    def layers_per_group(self) -> int:
        return self.ps.layers_per_group

    @property
    def filters(self) -> list[str]:
        return self.ps.filters

    @property
    def bounds(self) -> list[Bound]:
        return self.ps.bounds + self.flow.bounds

    @property
    def dim(self) -> int:
        return self.ps.dim

    @property
    def cells(self) -> list[str]:
        return self.ps.cells

    @property
    def models(self) -> list[str]:
        return self.ps.models

    def config_extra(self) -> dict[str, Any]:
        """What the data-flow phase adds to the run's identity (for ``resume``)."""
        f = self.flow
        return {"dataflow": [f.repeats, None if f.scale is None else vars(f.scale),
                             f.scale_filter]}

    def x0(self) -> list[float]:
        return self.ps.x0()

    def bound(self, name: str) -> Bound:
        return self.ps.bound(name)

    def space_of(self, candidate: Any) -> Any:
        """The space whose genome a trial's candidate holds."""
        return self.flow if isinstance(candidate, Mapping) and "ps" in candidate else self.ps

    # -- candidates -> recipes ----------------------------------------------------------------

    def recipe_dict(self, genome: Sequence[float], *, absolute: Mapping[str, str] | None = None,
                    name: str | None = None, ps: Sequence[float] | None = None
                    ) -> dict[str, Any]:
        if ps is not None:
            raise OptimizeError(f"{self.source}: a data-flow candidate is a staged recipe")
        return self.ps.recipe_dict(genome, absolute=absolute, name=name)

    def staged_dicts(self, genome: Sequence[float], *, absolute: Mapping[str, str] | None = None,
                     name: str | None = None, ps: Sequence[float] | None = None
                     ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]] | None:
        """None for a phase-1 genome; for a phase-2 one, the PS stage and the path over it."""
        if ps is None:
            return None
        stage = self.ps.recipe_dict(list(ps), absolute=absolute)
        final = self.flow.recipe_dict(genome, absolute=absolute, name=name)
        return [(PS_STAGE, stage)], final

    def recipe(self, genome: Sequence[float], *, ps: Sequence[float] | None = None,
               **kwargs: Any) -> Any:
        from modelalloy.recipe.load import recipe_from_dict

        staged = self.staged_dicts(genome, ps=ps, **kwargs)
        if staged is None:
            return self.ps.recipe(genome, **kwargs)
        return StagedRecipe([(n, recipe_from_dict(d, source=self.source,
                                                  base_dir=self.base_dir))
                             for n, d in staged[0]],
                            recipe_from_dict(staged[1], source=self.source,
                                             base_dir=self.base_dir))


def build_hybrid_space(data: Mapping[str, Any], search: Mapping[str, Any], *, source: str,
                       base_dir: Path, float_names: Sequence[str], names_of: Any
                       ) -> tuple[HybridSpace, Recipe]:
    """The two spaces of a ``ps+dfs`` template (``data``: the parsed YAML; ``names_of(recipe,
    model)``: a model's tensor names, from its header)."""
    flow_block = search.get("dataflow", {})
    if not isinstance(flow_block, Mapping):
        raise OptimizeError(f"{source}: search.dataflow must be a mapping (repeats, scale, "
                            "scale_filter)")
    check_keys(flow_block, HYBRID_KEYS, f"{source}: search.dataflow")
    ps_data = {**data, "search": {k: v for k, v in search.items()
                                  if k not in ("space", "dataflow")}}
    ps, template = build_space(ps_data, source=source, base_dir=base_dir,
                               float_names=float_names)
    repeats, scale, scale_filter = flow_settings(flow_block, source, "search.dataflow")
    reference = template.base_model if template.uses_base() else template.expert_entries()[0].model
    # the PS merge has the reference model's tensor names
    layouts = [layout_of(names_of(template, m), f"{source}: model '{m}'")
               for m in [reference, *ps.models]]
    flow = DataflowSpace(dict(ps.template), source, base_dir, [PS_STAGE, *ps.models], layouts,
                         repeats, scale, scale_filter)
    return HybridSpace(ps, flow), template
