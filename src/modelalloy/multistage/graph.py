"""Reading a multi-stage recipe and ordering its stages.

A multi-document YAML file; each document is a recipe with a ``name`` (at most one may have
none: the final merge, written to ``--out-path``). Wherever a recipe names a model
(``base_model``, ``models[i]`` / ``models[i].model``, ``tokenizer_source``, ``model+adapter``
strings, mergekit's ``{model: {path: ..}}``) a stage's name stands for that stage's output,
``<work>/<name>``. Dependencies form a graph; it is run in topological order and a cycle is
an error naming it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelalloy.errors import RecipeError
from modelalloy.recipe import Recipe
from modelalloy.recipe.load import read_recipe_text, recipe_from_dict
from modelalloy.recipe.safe_yaml import LimitedSafeLoader

MODEL_KEYS = ("model", "base_model", "tokenizer_source", "path")


@dataclass
class Stage:
    name: str | None  # None: the final, unnamed merge
    recipe: Recipe
    depends: list[str] = field(default_factory=list)
    output: Path | None = None


def _patch(value: Any, names: set[str], work: Path, used: set[str], key: str | None) -> Any:
    """``value`` with stage names (where a model goes) replaced by their output folders."""
    if isinstance(value, list):
        return [_patch(v, names, work, used, "model" if key == "models" else key)
                for v in value]
    if isinstance(value, dict):
        return {k: _patch(v, names, work, used, k) for k, v in value.items()}
    if isinstance(value, str) and key in MODEL_KEYS:
        head, plus, tail = value.partition("+")
        if head in names:
            used.add(head)
            return str(work / head) + plus + tail
    return value


def load_stages(path: str | Path, work: Path) -> list[Stage]:
    """Every stage of the file at ``path``, validated, with stage names resolved to
    ``work/<name>``; in file order."""
    path = Path(path)
    text = read_recipe_text(path)  # a regular file of plausible size, UTF-8
    try:
        # depth, alias and expanded-size limits, as a single recipe's
        docs = [d for d in yaml.load_all(text, Loader=LimitedSafeLoader)  # noqa: S506
                if d is not None]
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: cannot read the multi-stage recipe "
                          f"({' '.join(str(e).split())[:160]})") from None
    if not docs:
        raise RecipeError(f"{path}: the file has no recipes")
    raw: dict[str | None, dict] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise RecipeError(f"{path}: document {i + 1} is not a recipe mapping")
        doc = copy.deepcopy(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name
                                 or name.startswith(".")):
            raise RecipeError(f"{path}: document {i + 1}: name {name!r} must be a plain folder "
                              "name (no '/', not starting with '.')")
        if name in raw:
            what = f"name '{name}' is used twice" if name else "more than one recipe has no name"
            raise RecipeError(f"{path}: document {i + 1}: {what}; give each stage its own name")
        raw[name] = doc
    names = {n for n in raw if n is not None}
    stages = []
    for name, doc in raw.items():
        used: set[str] = set()
        patched = _patch(doc, names, work.resolve(), used, None)
        source = f"{path} (stage {name or 'final'})"
        recipe = recipe_from_dict(patched, source=source, base_dir=path.resolve().parent)
        stages.append(Stage(name, recipe, sorted(used)))
    return stages


def order_stages(stages: list[Stage]) -> list[Stage]:
    """Dependencies first (file order among independent stages); a cycle is an error."""
    by_name = {s.name: s for s in stages}
    done: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(stage: Stage, trail: list[str]) -> None:
        if state.get(stage.name) == "done":
            return
        if state.get(stage.name) == "active":
            cycle = trail[trail.index(stage.name or "final"):] + [stage.name or "final"]
            raise RecipeError(f"{stage.recipe.source.split(' (')[0]}: the stages form a cycle "
                              f"({' -> '.join(cycle)}); a stage cannot use its own output")
        state[stage.name] = "active"
        for dep in stage.depends:
            visit(by_name[dep], trail + [stage.name or "final"])
        state[stage.name] = "done"
        done.append(stage)

    for stage in stages:
        visit(stage, [])
    return done
