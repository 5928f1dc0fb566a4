"""``slices:`` — an output model assembled from layer ranges of its sources (mergekit's
frankenmerges, self-stacking, per-slice gradients).

Each slice lists sources of equal length (``layer_range: [start, end]``, end excluded); the
slices are laid end to end, so output layer j is layer ``start + o`` of every source of the
slice that covers it (o its offset in the slice). The method merges the sources of a slice as
it merges ``models``: the base model is the base (it must be among each slice's sources when
the method uses one) and the other sources, in order, are the models. Tensors outside the
layer stack come from the first slice's sources when they come before the stack (embeddings)
and from the last slice's otherwise (final norm, lm_head), as in mergekit; a tensor is "before"
when its name holds an embedding word (:data:`PRE_WORDS`) — mergekit reads this from its
per-architecture tables.

The engine merges :class:`ComposedCheckpoint` objects: one per role (the base, model 1,
model 2, ...), each naming the output's tensors and reading them from the source model and
layer the slice says. A layer used twice is read twice and written as two tensors, so no
output tensor shares storage with another. The output config's layer count (and per-layer
lists such as ``layer_types``) is rewritten for the new depth.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import PlanError
from modelalloy.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from modelalloy.io.layout import in_transformers_layout
from modelalloy.plan.layers import split_layer
from modelalloy.recipe import Recipe
from modelalloy.recipe.resolve import slice_experts

# Words that mark a tensor outside the layer stack as an input-side one (taken from the first
# slice); the rest (final norm, lm_head) come from the last slice.
PRE_WORDS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "tok_embeddings")
# Config keys that hold a decoder's layer count.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class _Source:
    ckpt: Checkpoint
    name: str


class ComposedCheckpoint:
    """Output tensor names mapped to tensors of real checkpoints (the engine's read API)."""

    def __init__(self, path: Path, config: dict | None, mapping: dict[str, _Source],
                 positions: dict[str, tuple[int, float]],
                 config_updates: dict | None = None) -> None:
        self.path = path
        self.config = config
        self._map = mapping
        self._positions = positions
        self.config_updates = config_updates or {}

    def names(self) -> list[str]:
        return list(self._map)

    def _src(self, name: str) -> _Source:
        try:
            return self._map[name]
        except KeyError:
            raise PlanError(f"{self.path}: the slices give no tensor {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self._src(name).ckpt.info(self._src(name).name)

    def __contains__(self, name: object) -> bool:
        return name in self._map

    def __len__(self) -> int:
        return len(self._map)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(f for s in self._map.values() for f in s.ckpt.files))

    @property
    def total_nbytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._map)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        src = self._src(name)
        return src.ckpt.get(src.name, out) if out is not None else src.ckpt.get(src.name)

    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        src = self._src(name)
        return src.ckpt.get_slice(src.name, start, out)

    def prefetch(self, name: str) -> bool:
        src = self._map.get(name)
        return False if src is None else src.ckpt.prefetch(src.name)

    def slice_position(self, name: str) -> tuple[int, float]:
        """(slice index, t) whose parameters apply to output tensor ``name``."""
        return self._positions[name]

    def close(self) -> None:  # the real checkpoints are closed by their ExitStack
        pass

    def __repr__(self) -> str:
        return f"ComposedCheckpoint({str(self.path)!r}, {len(self._map)} tensors)"


Stacks = dict[str, dict[int, list[str]]]  # stack prefix -> raw layer index -> tensor names


def _layers(ckpt: Checkpoint) -> tuple[Stacks, list[str]]:
    """(layer stacks, names outside every stack)."""
    stacks: Stacks = {}
    outside = []
    for name in ckpt.names():
        found = split_layer(name)
        if found is None:
            outside.append(name)
        else:
            stacks.setdefault(found[0], {}).setdefault(found[1], []).append(name)
    return {k: dict(sorted(v.items())) for k, v in stacks.items()}, outside


# mergekit's module names for VLM text decoders, and the stack words they stand for
TEXT_MODULES = {"text_decoder": ("language_model", "text_model")}


def _in(part: str, name: str) -> bool:
    """``part`` is a run of whole dotted components of ``name``."""
    return f".{part}." in f".{name}."


def module_stack(module: str | None, stacks: Stacks, where: str) -> str | None:
    """The layer stack a module stands for: the only stack without ``modules:``; else the
    stack named by the module (mergekit's inferred module names are stack prefixes such as
    ``language_model.model.layers``; ``vision_tower`` names the stack under it;
    ``text_decoder`` the language model's; ``default`` the only stack of a plain model).
    None: a module without layers (``multi_modal_projector``; ``default`` of a VLM, which
    holds the tensors outside every stack)."""
    if module is None:
        if len(stacks) != 1:
            raise PlanError(f"{where}: `slices` needs one layer stack, found {len(stacks)} "
                            f"({', '.join(sorted(stacks)) or 'none'}); models with several "
                            "stacks (vision towers) need mergekit's `modules:`, one per stack")
        return next(iter(stacks))
    if module == "default" and len(stacks) == 1:  # mergekit's one module of a plain model
        return next(iter(stacks))
    words = TEXT_MODULES.get(module, (module,))
    found = [p for p in stacks if p == module or any(_in(w, p) for w in words)]
    if len(found) > 1:
        raise PlanError(f"{where}: module '{module}' matches several layer stacks "
                        f"({', '.join(sorted(found))}); name the module by its stack")
    return found[0] if found else None


def open_slices(recipe: Recipe, stack: ExitStack,
                opener: Callable[[str], Any] | None = None
                ) -> tuple[ComposedCheckpoint | None, list[ComposedCheckpoint]]:
    """The base and model roles of a ``slices:`` (or ``modules:``) recipe as composed
    checkpoints.

    ``opener``: the tensor source of a model reference (the in-memory path's state dicts);
    default: the model's checkpoint, opened once per folder."""
    opened: dict[str, Checkpoint] = {}

    def ckpt(model: str) -> Checkpoint:
        if opener is not None:
            if model not in opened:
                opened[model] = opener(model)
            return opened[model]
        path = recipe.model_path(model)
        if str(path) not in opened:  # under transformers 5's names (io/layout.py)
            opened[str(path)] = in_transformers_layout(
                stack.enter_context(open_checkpoint(path)))
        return opened[str(path)]

    uses_base = recipe.uses_base()
    slices = recipe.slices or []
    # each slice's sources by role: index 0 the base (when used), then the models in order
    roles = []
    for sl in slices:
        others = slice_experts(recipe, sl)
        base = [s for s in sl.sources if s not in others]
        roles.append(base + others if uses_base else others)
    n_roles = len(roles[0])
    maps: list[dict[str, _Source]] = [{} for _ in range(n_roles)]
    positions: dict[str, tuple[int, float]] = {}
    layout = {id(c): _layers(c) for c in {id(ckpt(s.model)): ckpt(s.model)
                                           for sl in slices for s in sl.sources}.values()}
    # the modules in recipe order, each with its slices' indices (one module: no `modules:`)
    modules: dict[str | None, list[int]] = {}
    for index, sl in enumerate(slices):
        modules.setdefault(sl.module, []).append(index)
    first_stacks = layout[id(ckpt(roles[0][0].model))][0]
    where = f"{recipe.source}"
    stack_of = {m: module_stack(m, first_stacks, where) for m in modules}

    def take(index: int, name: str) -> None:
        positions[name] = (index, 0.0)
        for r, src in enumerate(roles[index]):
            maps[r][name] = _Source(ckpt(src.model), name)

    loose = layout[id(ckpt(roles[0][0].model))][1]
    owner = {name: _loose_module(name, modules, stack_of) for name in loose}
    layer_counts: dict[str, int] = {}
    layer_types: list[Any] = []
    for module, indices in modules.items():
        for name in loose:  # input-side tensors before the module's layers
            if owner[name] == module and any(w in name for w in PRE_WORDS):
                take(indices[0], name)
        prefix = stack_of[module]
        out_layer = 0
        for index in indices:
            out_layer = _compose_slice(recipe, index, roles[index], prefix, out_layer, ckpt,
                                       layout, maps, positions,
                                       layer_types if prefix == next(iter(first_stacks), None)
                                       else [])
        if prefix is not None:
            layer_counts[prefix] = out_layer
        for name in loose:
            if owner[name] == module and not any(w in name for w in PRE_WORDS):
                take(indices[-1], name)

    def composed(r: int) -> ComposedCheckpoint:
        first = ckpt(roles[0][r].model)
        updates = _config_updates(first.config, layer_counts, layer_types,
                                  len(first_stacks) > 1)
        # the composed model's own config: the source's, with the new depth
        config = {**first.config, **updates} if first.config is not None else None
        return ComposedCheckpoint(first.path, config, maps[r], positions, updates)

    checkpoints = [composed(r) for r in range(n_roles)]
    if uses_base:
        return checkpoints[0], checkpoints[1:]
    return None, checkpoints


def _loose_module(name: str, modules: dict[str | None, list[int]],
                  stack_of: dict[str | None, str | None]) -> str | None:
    """The module a tensor outside every stack belongs to: the module it is named under
    (``multi_modal_projector.*``), else ``default`` (mergekit's module of the loose tensors
    of inferred architectures), else the module whose stack shares its first component
    (``language_model.lm_head``), else the first module."""
    for module in modules:
        if module is not None and module != "default" and name.startswith(f"{module}."):
            return module
    if "default" in modules:
        return "default"
    head = name.split(".")[0]
    for module, prefix in stack_of.items():
        if prefix is not None and prefix.split(".")[0] == head:
            return module
    return next(iter(modules))


def _compose_slice(recipe: Recipe, index: int, sources: list, prefix: str | None,
                   out_layer: int, ckpt: Any, layout: dict, maps: list[dict[str, _Source]],
                   positions: dict[str, tuple[int, float]], layer_types: list) -> int:
    """Map slice ``index``'s layers (of stack ``prefix``) to output layers from ``out_layer``
    on; return the next free output layer."""
    sl = recipe.slices[index]  # type: ignore[index]
    if prefix is None:
        if any(s.layer_range is not None for s in sl.sources):
            raise PlanError(f"{recipe.source}: module '{sl.module}' has no layer stack in "
                            "these models, so its sources take no layer_range")
        return out_layer
    lengths = set()
    for src in sl.sources:
        raw = sorted(layout[id(ckpt(src.model))][0].get(prefix, {}))
        rng = src.layer_range or (0, len(raw))
        if rng[1] > len(raw):
            raise PlanError(f"{recipe.source}: slices[{index}]: layer_range {list(rng)} of "
                            f"'{src.model}' goes past its {len(raw)} layers")
        lengths.add(rng[1] - rng[0])
    if len(lengths) != 1:
        raise PlanError(f"{recipe.source}: module '{sl.module}': its models have different "
                        f"layer counts {sorted(lengths)}")
    length = lengths.pop()
    for offset in range(length):
        t = offset / (length - 1) if length > 1 else 1.0
        for r, src in enumerate(sources):
            c = ckpt(src.model)
            layers = layout[id(c)][0][prefix]
            raw = sorted(layers)
            i = (src.layer_range or (0, 0))[0] + offset
            for name in layers[raw[i]]:
                rest = name[len(prefix) + bool(prefix) + len(str(raw[i])):]
                out = f"{prefix}{'.' if prefix else ''}{out_layer}{rest}"
                maps[r][out] = _Source(c, name)
                positions[out] = (index, t)
            if r == 0:
                layer_types.append(_layer_type(c.config, i))
        out_layer += 1
    return out_layer


def _layer_type(config: dict | None, index: int):
    types = (config or {}).get("layer_types")
    return types[index] if isinstance(types, list) and index < len(types) else None


def _config_updates(config: dict | None, layer_counts: dict[str, int], layer_types: list,
                    several: bool) -> dict:
    """The output config's layer counts (and ``layer_types``): top-level keys for a model of
    one stack; for several (VLMs), ``text_config`` / ``vision_config`` by the stack's name."""
    config = config or {}
    updates: dict[str, Any] = {}
    for prefix, layers in layer_counts.items():
        if several:
            key = "vision_config" if any(w in prefix for w in ("vision", "visual")) \
                else "text_config"
            section = config.get(key) if isinstance(config.get(key), dict) else None
            if section is None:
                continue
            sub: dict[str, Any] = {k: layers for k in LAYER_COUNT_KEYS
                                   if isinstance(section.get(k), int)}
            if _types_fit(section, layer_types) and key == "text_config":
                sub["layer_types"] = layer_types
            if any(section.get(k) != v for k, v in sub.items()):
                updates[key] = {**section, **updates.get(key, {}), **sub}
            continue
        updates.update({k: layers for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)})
        if _types_fit(config, layer_types):
            updates["layer_types"] = layer_types
    return updates


def _types_fit(section: dict, layer_types: list) -> bool:
    return isinstance(section.get("layer_types"), list) and bool(layer_types) \
        and None not in layer_types
