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

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import PlanError
from modelalloy.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
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


def _layers(ckpt: Checkpoint) -> tuple[str, dict[int, list[str]], list[str]]:
    """(stack prefix, raw layer index -> the layer's tensor names, names outside the stack)."""
    stacks: dict[str, dict[int, list[str]]] = {}
    outside = []
    for name in ckpt.names():
        found = split_layer(name)
        if found is None:
            outside.append(name)
        else:
            stacks.setdefault(found[0], {}).setdefault(found[1], []).append(name)
    if len(stacks) != 1:
        raise PlanError(f"{ckpt.path}: `slices` needs one layer stack, found "
                        f"{len(stacks)} ({', '.join(sorted(stacks)) or 'none'}); models with "
                        "several stacks (vision towers) need mergekit's `modules`, not "
                        "supported yet")
    prefix, layers = next(iter(stacks.items()))
    return prefix, dict(sorted(layers.items())), outside


def open_slices(recipe: Recipe, stack: ExitStack) -> tuple[ComposedCheckpoint | None,
                                                            list[ComposedCheckpoint]]:
    """The base and model roles of a ``slices:`` recipe as composed checkpoints."""
    opened: dict[str, Checkpoint] = {}

    def ckpt(model: str) -> Checkpoint:
        path = recipe.model_path(model)
        if str(path) not in opened:
            opened[str(path)] = stack.enter_context(open_checkpoint(path))
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

    def outside(which: int, pre: bool) -> None:
        first = ckpt(roles[which][0].model)
        for name in layout[id(first)][2]:
            if any(w in name for w in PRE_WORDS) != pre:
                continue
            positions[name] = (which if which >= 0 else len(roles) + which, 0.0)
            for r, src in enumerate(roles[which]):
                maps[r][name] = _Source(ckpt(src.model), name)

    outside(0, pre=True)
    out_layer = 0
    template_prefix = layout[id(ckpt(roles[0][0].model))][0]
    layer_types = []
    for index, sl in enumerate(slices):
        for offset in range(sl.length):
            t = offset / (sl.length - 1) if sl.length > 1 else 1.0
            for r, src in enumerate(roles[index]):
                c = ckpt(src.model)
                prefix, layers, _ = layout[id(c)]
                raw = sorted(layers)
                i = src.layer_range[0] + offset
                if src.layer_range[1] > len(raw):
                    raise PlanError(f"{recipe.source}: slices[{index}]: layer_range "
                                    f"{list(src.layer_range)} of '{src.model}' goes past its "
                                    f"{len(raw)} layers")
                for name in layers[raw[i]]:
                    rest = name[len(prefix) + bool(prefix) + len(str(raw[i])):]
                    out = f"{template_prefix}{'.' if template_prefix else ''}{out_layer}{rest}"
                    maps[r][out] = _Source(c, name)
                    positions[out] = (index, t)
                if r == 0:
                    layer_types.append(_layer_type(c.config, i))
            out_layer += 1
    outside(-1, pre=False)

    def composed(r: int) -> ComposedCheckpoint:
        first = ckpt(roles[0][r].model)
        updates = _config_updates(first.config, out_layer, layer_types)
        # the composed model's own config: the source's, with the new depth
        config = {**first.config, **updates} if first.config is not None else None
        return ComposedCheckpoint(first.path, config, maps[r], positions, updates)

    checkpoints = [composed(r) for r in range(n_roles)]
    if uses_base:
        return checkpoints[0], checkpoints[1:]
    return None, checkpoints


def _layer_type(config: dict | None, index: int):
    types = (config or {}).get("layer_types")
    return types[index] if isinstance(types, list) and index < len(types) else None


def _config_updates(config: dict | None, layers: int, layer_types: list) -> dict:
    """The output config's layer count (and ``layer_types``) for ``layers`` layers."""
    config = config or {}
    updates: dict[str, Any] = {key: layers for key in LAYER_COUNT_KEYS
                               if isinstance(config.get(key), int)}
    if isinstance(config.get("layer_types"), list) and None not in layer_types:
        updates["layer_types"] = layer_types
    return updates
