"""The search space of a recipe template: which parameters are free, at which granularity.

A template is a normal recipe with a ``search:`` block (removed before the recipe is
validated)::

    merge_method: ties
    base_model: ./base
    models: [{model: ./math}, {model: ./code}]
    search:
      granularity: group        # task | layer | group (consecutive layers) ; default task
      layers_per_group: 2       # group only (mergekit-evolve's layer_granularity)
      filters: [attn, mlp]      # parameter sets by name filter (first match; the rest is one
                                # more set), crossed with the granularity
      parameters:
        weight: [0.0, 1.0]                          # bounds
        density: {min: 0.1, max: 1.0, init: 1.0}    # bounds and start point

A *cell* is one (layer or layer group, parameter set) pair; tensors outside every layer stack
(embeddings, final norm, head) form the group ``other``. A per-model parameter has one gene per
cell and model, a global one (``lambda``) one per cell. Genes live in the unit cube: gene u is
the value ``lo + u·(hi − lo)``. :meth:`SearchSpace.recipe` turns a genome into a plain recipe
(the cell values as mergekit conditional ``filter`` entries, checked to resolve to the intended
value for every tensor) that ``modelalloy merge`` runs as any other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelalloy.errors import OptimizeError, RecipeError
from modelalloy.optimize.genes import Bound, Gene, check_keys
from modelalloy.plan.layers import split_layer
from modelalloy.recipe.model import Conditional, Recipe, evaluate_setting

GRANULARITIES = ("task", "layer", "group")
SEARCH_KEYS = ("space", "granularity", "layers_per_group", "filters", "parameters", "methods")
SPACES = ("parameters", "dataflow", "ps+dfs")  # optimize/dataflow.py, optimize/hybrid.py
OTHER = "other"


@dataclass
class SearchSpace:
    """Cells, genes and the template they fill (see the module docstring)."""

    template: dict[str, Any]
    source: str
    base_dir: Path
    granularity: str
    layers_per_group: int
    filters: list[str]
    bounds: list[Bound]
    models: list[str]          # the merged models (expert order), as the template names them
    cells: list[str]
    cell_of: dict[str, int]    # float tensor name -> cell
    genes: list[Gene] = field(default_factory=list)
    # a method per cell (``search.methods``; a gene ``method`` per cell, the template's method
    # first); empty: the template's method everywhere
    methods: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return len(self.genes)

    def bound(self, name: str) -> Bound:
        return next(b for b in self.bounds if b.name == name)

    def x0(self) -> list[float]:
        """The start genome (unit coordinates of each parameter's ``init``; the template's
        method in every cell)."""
        return [method_unit(0, len(self.methods)) if g.param == METHOD
                else self.bound(g.param).unit(self.bound(g.param).init) for g in self.genes]

    def values(self, genome: Sequence[float]) -> dict[Gene, float]:
        if len(genome) != self.dim:
            raise OptimizeError(f"{self.source}: genome of {len(genome)} genes for a space of "
                                f"{self.dim}")
        return {g: self.bound(g.param).value(u) for g, u in zip(self.genes, genome, strict=True)
                if g.param != METHOD}

    def cell_methods(self, genome: Sequence[float]) -> list[str]:
        """The method of each cell: gene u picks methods[min(⌊u·K⌋, K − 1)]."""
        if not self.methods:
            return [self.template["merge_method"]] * len(self.cells)
        out = [self.methods[0]] * len(self.cells)
        for g, u in zip(self.genes, genome, strict=True):
            if g.param == METHOD:
                out[g.cell] = self.methods[method_index(u, len(self.methods))]
        return out

    def table(self, genome: Sequence[float]) -> dict[str, list[list[float]]]:
        """Per parameter, a (cells × models) table of values (one column for a global one)."""
        vals = self.values(genome)
        out: dict[str, list[list[float]]] = {}
        for b in self.bounds:
            cols = len(self.models) if b.per_model else 1
            rows = [[math.nan] * cols for _ in self.cells]
            for g, v in vals.items():
                if g.param == b.name:
                    rows[g.cell][g.model or 0] = v
            out[b.name] = rows
        return out

    # -- genome -> recipe --------------------------------------------------------------------

    def setting(self, per_cell: Sequence[float]) -> Any:
        """A recipe setting giving tensor n the value ``per_cell[cell_of[n]]``: a scalar when
        all cells agree, else conditional entries (compact when that resolves right, else one
        per tensor, longest name first)."""
        if len(set(per_cell)) == 1:
            return per_cell[0]
        target = {n: per_cell[c] for n, c in self.cell_of.items()}
        for entries in (self._compact(per_cell), self._per_tensor(target)):
            if entries is not None and _resolves(entries, target):
                return entries
        raise OptimizeError(f"{self.source}: cannot express the cell values as filters")

    def _compact(self, per_cell: Sequence[float]) -> list[dict[str, Any]] | None:
        """One entry per layer (``stack.i.``) or parameter set, the ``other`` cell last as a
        catch-all; None when the cells are not of that shape."""
        entries: list[dict[str, Any]] = []
        for c, label in enumerate(self.cells):
            if label == OTHER:
                continue
            prefixes = _cell_prefixes(label)
            if prefixes is None:
                return None
            entries += [{"filter": p, "value": per_cell[c]} for p in prefixes]
        if OTHER in self.cells:
            entries.append({"value": per_cell[self.cells.index(OTHER)]})
        return entries

    @staticmethod
    def _per_tensor(target: Mapping[str, float]) -> list[dict[str, Any]]:
        names = sorted(target, key=lambda n: (-len(n), n))
        return [{"filter": n, "value": target[n]} for n in names]

    def recipe_dict(self, genome: Sequence[float], *, absolute: Mapping[str, str] | None = None,
                    name: str | None = None, method: str | None = None) -> dict[str, Any]:
        """The template with the genome's values filled in (``absolute`` maps model strings
        to the paths to write, so the recipe works from any folder); ``method``: with that
        merge method instead (the parameters it lacks left out)."""
        import copy

        vals = self.values(genome)
        if method is None and self.methods:  # one method in every cell: that one
            method = self.cell_methods(genome)[0]
        out = copy.deepcopy(self.template)
        rename = dict(absolute or {})
        if name:
            out["name"] = name
        if method is not None and method != out["merge_method"]:
            _retarget(out, method)
        accepted = _param_names(out["merge_method"])
        if out.get("base_model") is not None:
            out["base_model"] = rename.get(out["base_model"], out["base_model"])
        entries = out["models"]
        expert_index = {m: k for k, m in enumerate(self.models)}
        for entry in entries:
            k = expert_index.get(entry["model"])
            entry["model"] = rename.get(entry["model"], entry["model"])
            if k is None:
                continue
            params = entry.setdefault("parameters", {})
            for b in self.bounds:
                if b.per_model and b.name in accepted:
                    per_cell = [0.0] * len(self.cells)
                    for g, v in vals.items():
                        if g.param == b.name and g.model == k:
                            per_cell[g.cell] = v
                    params[b.name] = self.setting(per_cell)
        top = out.setdefault("parameters", {})
        for b in self.bounds:
            if not b.per_model and b.name in accepted:
                per_cell = [0.0] * len(self.cells)
                for g, v in vals.items():
                    if g.param == b.name:
                        per_cell[g.cell] = v
                top[b.name] = self.setting(per_cell)
        if not top:
            del out["parameters"]
        for entry in entries:
            if not entry.get("parameters", True):
                del entry["parameters"]
        return out

    def recipe(self, genome: Sequence[float], **kwargs: Any) -> Any:
        """The genome's recipe; with several methods in use, a :class:`StagedRecipe`."""
        from modelalloy.recipe.load import recipe_from_dict

        staged = self.staged_dicts(genome, **kwargs)
        if staged is not None:
            return StagedRecipe([(n, recipe_from_dict(d, source=self.source,
                                                      base_dir=self.base_dir))
                                 for n, d in staged[0]],
                                recipe_from_dict(staged[1], source=self.source,
                                                 base_dir=self.base_dir))
        return recipe_from_dict(self.recipe_dict(genome, **kwargs), source=self.source,
                                base_dir=self.base_dir)

    def staged_dicts(self, genome: Sequence[float], *, absolute: Mapping[str, str] | None = None,
                     name: str | None = None
                     ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]] | None:
        """With a method per cell and more than one in use: one stage per method used (the
        genome's recipe with that method) and the final merge, ``linear`` over the stages with
        weight 1 where a cell uses the stage's method and 0 elsewhere — mergekit-multi's
        format, which ``modelalloy merge-multi`` runs. None when one method covers every cell
        (then :meth:`recipe_dict`, with that method, is the recipe)."""
        per_cell = self.cell_methods(genome)
        used = [m for m in self.methods if m in per_cell]
        if len(used) < 2:
            return None
        stages = [(stage_name(m), self.recipe_dict(genome, absolute=absolute, method=m))
                  for m in used]
        final: dict[str, Any] = {
            "merge_method": "linear",
            "models": [{"model": stage_name(m), "parameters": {"weight": self.setting(
                [1.0 if c == m else 0.0 for c in per_cell])}} for m in used],
            "parameters": {"normalize": True},
            **{k: self.template[k] for k in ("dtype", "out_dtype") if k in self.template}}
        if name:
            final["name"] = name
        return stages, final


def _resolves(entries: list[dict[str, Any]], target: Mapping[str, float]) -> bool:
    conds = [Conditional(**e) for e in entries]
    return all(evaluate_setting(n, conds) == v for n, v in target.items())


def _cell_prefixes(label: str) -> list[str] | None:
    """Filters of a cell labelled ``layers:stack:i,j,..`` (a layer or group, no sets) or
    ``set:<filter>``; None for a crossed cell."""
    if label.startswith("set:"):
        return [label[4:]]
    if label.startswith("layers:") and "|" not in label:
        _, stack, idx = label.split(":", 2)
        return [f"{stack}.{i}." if stack else f"{i}." for i in idx.split(",")]
    return None


METHOD = "method"  # the gene that picks a cell's merge method


def method_unit(index: int, count: int) -> float:
    """The unit value of method ``index`` of ``count`` (the middle of its interval)."""
    return (index + 0.5) / count


def method_index(unit: float, count: int) -> int:
    return min(count - 1, max(0, int(float(unit) * count)))


def stage_name(method: str) -> str:
    return f"stage_{method}"


def _param_names(method: str) -> set[str]:
    from modelalloy.methods.registry import get_method

    return {p.name for p in get_method(method).params}


def _retarget(recipe: dict[str, Any], method: str) -> None:
    """``recipe`` (a template dict) with ``method``: the parameters it lacks left out."""
    accepted = _param_names(method)
    recipe["merge_method"] = method
    for holder in [recipe, *[e for e in recipe.get("models", []) if isinstance(e, dict)]]:
        params = holder.get("parameters")
        if isinstance(params, dict):
            holder["parameters"] = {k: v for k, v in params.items() if k in accepted}


@dataclass
class StagedRecipe:
    """A candidate made of several recipes: each stage merged from the models, then the final
    recipe merged from the stages' outputs (its models are the stage names)."""

    stages: list[tuple[str, Recipe]]
    final: Recipe
    comment: str | None = None

    def to_yaml(self) -> str:
        """mergekit-multi's format: one YAML document per named stage, the final unnamed."""
        head = f"# {self.comment}\n" if self.comment else ""
        head += "# run with: `modelalloy merge-multi THIS.yaml -I WORK --out-path OUT`\n"
        return head + "---\n".join([r.to_yaml() for _, r in self.stages]
                                   + [self.final.to_yaml()])


# -- building a space from a template -----------------------------------------------------------


def split_template(data: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the recipe without ``search``, the search block); a missing or empty block is an error."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe template must be a YAML mapping")
    recipe = {k: v for k, v in data.items() if k != "search"}
    search = data.get("search")
    if isinstance(search, Mapping) and search.get("space", "parameters") != "parameters":
        if search["space"] not in SPACES:
            raise OptimizeError(f"{source}: search.space '{search['space']}': use one of "
                                f"{', '.join(SPACES)}")
        return recipe, dict(search)  # the data-flow space checks its own keys
    if not search or not isinstance(search, Mapping) or not search.get("parameters"):
        raise OptimizeError(f"{source}: no free parameter: add a `search:` block with "
                            "`parameters:` (e.g. `search: {parameters: {weight: [0, 1]}}`)")
    check_keys(search, SEARCH_KEYS, f"{source}: search")
    return recipe, dict(search)


def _bound(name: str, given: Any, param: Any, n_models: int, source: str) -> Bound:
    where = f"{source}: search.parameters.{name}"
    if isinstance(given, (list, tuple)) and len(given) == 2:
        lo, hi, init = given[0], given[1], None
    elif isinstance(given, Mapping):
        bad = [k for k in given if k not in ("min", "max", "init")]
        if bad:
            raise OptimizeError(f"{where}.{bad[0]}: unknown key; use min, max, init")
        lo = given.get("min", param.ge if param.ge is not None else 0.0)
        hi = given.get("max", param.le if param.le is not None else 1.0)
        init = given.get("init")
    else:
        raise OptimizeError(f"{where}: give bounds as [min, max] or {{min, max, init}}")
    try:
        lo, hi = float(lo), float(hi)
        init = None if init is None else float(init)
    except (TypeError, ValueError):
        raise OptimizeError(f"{where}: bounds must be numbers") from None
    if not lo <= hi:
        raise OptimizeError(f"{where}: min {lo} is above max {hi}")
    if init is None:  # mergekit-evolve's start: weight 1/K, density 1, else the middle
        init = {"weight": 1.0 / n_models, "density": hi}.get(name, (lo + hi) / 2)
    init = min(hi, max(lo, init))
    for v in (lo, hi):
        param.check(v, where)
    return Bound(name, lo, hi, init, param.per_model)


def _cells(names: Sequence[str], granularity: str, per_group: int,
           filters: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Cell labels and the cell of each float tensor."""
    from modelalloy.plan.layers import LayerIndexer

    indexer = LayerIndexer(names)
    raw_of: dict[tuple[str, int], list[int]] = {}
    for n in names:
        found = split_layer(n)
        layer, _ = indexer.lookup(n)
        if found is not None and layer is not None:
            raw_of.setdefault((found[0], layer // (per_group if granularity == "group" else 1)),
                              []).append(found[1])

    def layer_label(n: str) -> str:
        if granularity == "task":
            return "all"
        found = split_layer(n)
        layer, _ = indexer.lookup(n)
        if found is None or layer is None:
            return OTHER
        key = (found[0], layer // (per_group if granularity == "group" else 1))
        ids = ",".join(str(i) for i in sorted(set(raw_of[key])))
        return f"layers:{found[0]}:{ids}"

    def set_label(n: str) -> str | None:
        if not filters:
            return None
        return next((f"set:{f}" for f in filters if f in n), "set:rest")

    labels: list[str] = []
    cell_of: dict[str, int] = {}
    for n in names:
        lay, st = layer_label(n), set_label(n)
        if st is None:
            label = lay
        elif lay == "all":
            label = st if st != "set:rest" else OTHER
        else:
            label = f"{lay}|{st}"
        if label not in labels:
            labels.append(label)
        cell_of[n] = labels.index(label)

    def order(label: str) -> tuple:  # stacks and layers in order, sets as listed, other last
        lay, _, st = label.partition("|")
        parts = lay.split(":")
        first = int(parts[2].split(",")[0]) if parts[0] == "layers" else -1
        set_rank = (filters.index(st[4:]) if st[4:] in filters else len(filters)) if st else (
            filters.index(lay[4:]) if lay.startswith("set:") and lay[4:] in filters else 0)
        return (label == OTHER, parts[1] if parts[0] == "layers" else "", first, set_rank)

    sorted_labels = sorted(labels, key=order)
    rank = {old: sorted_labels.index(label) for old, label in enumerate(labels)}
    return sorted_labels, {n: rank[c] for n, c in cell_of.items()}


def build_space(data: Mapping[str, Any], *, source: str, base_dir: Path,
                float_names: Sequence[str]) -> tuple[SearchSpace, Recipe]:
    """The space of a template (``data``: the parsed YAML) over the reference model's float
    tensors, and the template recipe itself (validated, at its own parameter values)."""
    from modelalloy.recipe.load import recipe_from_dict

    recipe_data, search = split_template(data, source)
    recipe = recipe_from_dict(recipe_data, source=source, base_dir=base_dir)
    spec = recipe.method_spec()
    granularity = search.get("granularity", "task")
    if granularity not in GRANULARITIES:
        raise OptimizeError(f"{source}: search.granularity '{granularity}': use one of "
                            f"{', '.join(GRANULARITIES)}")
    per_group = int(search.get("layers_per_group", 1))
    if per_group < 1:
        raise OptimizeError(f"{source}: search.layers_per_group must be at least 1")
    filters = list(search.get("filters") or [])
    if not all(isinstance(f, str) and f for f in filters):
        raise OptimizeError(f"{source}: search.filters must be a list of name substrings")
    experts = recipe.expert_entries()
    methods = _methods(search.get("methods"), recipe_data, source, base_dir)
    params = {p.name: p for p in spec.params}
    for m in methods[1:]:  # a parameter of any searched method may be free
        params.update({p.name: p for p in _method_params(m) if p.name not in params})
    bounds = []
    for name, given in dict(search["parameters"]).items():
        if name not in params:
            which = (f"methods {', '.join(methods)} have" if methods else
                     f"method '{recipe.merge_method}' has")
            raise OptimizeError(f"{source}: search.parameters.{name}: {which} no such "
                                f"parameter; {'they have' if methods else 'it has'} "
                                f"{', '.join(params) or 'none'}")
        if params[name].type is not float and params[name].type is not int:
            raise OptimizeError(f"{source}: search.parameters.{name}: only numeric parameters "
                                "can be searched")
        bounds.append(_bound(name, given, params[name], len(experts), source))
    cells, cell_of = _cells(list(float_names), granularity, per_group, filters)
    genes = []
    for c in range(len(cells)):
        for b in bounds:
            genes += ([Gene(b.name, c, k) for k in range(len(experts))] if b.per_model
                      else [Gene(b.name, c, None)])
        if methods:
            genes.append(Gene(METHOD, c, None))
    space = SearchSpace(recipe_data, source, base_dir, granularity, per_group, filters, bounds,
                        [e.model for e in experts], cells, cell_of, genes, methods)
    return space, recipe


def _method_params(method: str) -> list[Any]:
    from modelalloy.methods.registry import get_method

    return list(get_method(method).params)


def _methods(given: Any, recipe_data: Mapping[str, Any], source: str,
             base_dir: Path) -> list[str]:
    """``search.methods``: the template's method first, then the others; each checked on the
    template's models (a method that cannot merge them is refused here, not mid-search)."""
    import copy

    from modelalloy.errors import ModelAlloyError
    from modelalloy.recipe.load import recipe_from_dict

    if given is None:
        return []
    if not (isinstance(given, list) and all(isinstance(m, str) and m for m in given)):
        raise OptimizeError(f"{source}: search.methods must be a list of merge method names")
    first = recipe_data["merge_method"]
    methods = [first] + [m for m in dict.fromkeys(given) if m != first]
    if len(methods) < 2:
        raise OptimizeError(f"{source}: search.methods: name at least one method besides "
                            f"the template's '{first}'")
    for m in methods[1:]:
        data = copy.deepcopy(dict(recipe_data))
        try:
            _retarget(data, m)
            recipe_from_dict(data, source=source, base_dir=base_dir)
        except ModelAlloyError as err:
            raise OptimizeError(f"{source}: search.methods: '{m}' cannot merge this "
                                f"template's models: {err}") from None
    return methods


def reference_float_names(recipe: Recipe) -> list[str]:
    """The float tensors of the recipe's reference model (base, else first model), from the
    headers only; opened as the engine opens it (``BUNDLE#TASK``, ``model+adapter``)."""
    from modelalloy.engine.run import open_recipe_model

    ref = recipe.base_model if recipe.uses_base() else recipe.expert_entries()[0].model
    with open_recipe_model(recipe, ref) as ckpt:
        return [n for n in ckpt.names() if ckpt.info(n).dtype.is_floating_point]
