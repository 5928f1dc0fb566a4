"""Models as engine sources besides a checkpoint on disk: a state dict or a live torch module
(:class:`StateDictSource`), and an expert rebuilt from a TALL-masks bundle
(:class:`TallExpertSource`).

A :class:`StateDictSource` answers the planner and the executor exactly as a checkpoint on disk
does (:class:`modelalloy.plan.sources.TensorSource`), without copying: it holds detached views
of the caller's tensors, planning reads only their shapes and dtypes, and a slice is copied
straight from the tensor into the engine's cache-sized buffer (the disk path's ``preadv``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.tall_bundle import TallBundleFolder, mask_key, rebuild_values, unpack_bits
from modelalloy.plan.sources import TensorSource


@dataclass(frozen=True)
class MemoryTensorInfo:
    """Shape, dtype and size of an in-memory tensor (the planner's view of it)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def state_of(model: Mapping[str, torch.Tensor] | torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """A module's state dict (views of its parameters and buffers), or the mapping itself."""
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"expected a state dict or a torch module, got {type(model).__name__}")


class StateDictSource:
    """One in-memory model, read by the engine like a checkpoint. Thread-safe; never copies a
    whole tensor (except, once, a non-contiguous one that is read in slices)."""

    config: dict[str, Any] | None = None

    def __init__(self, label: str, model: Mapping[str, torch.Tensor] | torch.nn.Module):
        self.path = label
        tensors = {}
        for name, tensor in state_of(model).items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{label}: entry {name!r} is a {type(tensor).__name__}, "
                                      "not a tensor; pass a state dict of tensors or a module")
            # detached: the merge never records autograd history, whatever the thread
            tensors[name] = tensor.detach()
        self._tensors = tensors
        self._flat: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}; check the tensor "
                                  "name or the model") from None

    def info(self, name: str) -> MemoryTensorInfo:
        t = self.tensor(name)
        return MemoryTensorInfo(name, tuple(t.shape), t.dtype, t.numel() * t.element_size())

    def get(self, name: str) -> torch.Tensor:
        """The tensor itself (a detached view, on its own device, in its own dtype)."""
        return self.tensor(name)

    def _flattened(self, name: str) -> torch.Tensor:
        t = self.tensor(name)
        if t.is_contiguous():
            return t.view(-1)
        with self._lock:  # a strided tensor is made contiguous once, not once per slice
            flat = self._flat.get(name)
            if flat is None:
                flat = self._flat[name] = t.contiguous().view(-1)
            return flat

    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. start + out.numel()`` of the flattened tensor, copied into
        ``out`` (a 1-D buffer of the tensor's dtype)."""
        flat = self._flattened(name)
        count = out.numel()
        if out.dtype != flat.dtype or out.dim() != 1 or start < 0 or start + count > flat.numel():
            raise ValueError(f"slice [{start}, {start + count}) of {name!r} ({flat.numel()} "
                             f"elements, {flat.dtype}) does not fit a {out.dtype} buffer of "
                             f"{count}")
        return out.copy_(flat[start:start + count])

    def prefetch(self, name: str) -> bool:
        return False  # already in memory

    def close(self) -> None:
        self._flat.clear()

    def __repr__(self) -> str:
        return f"StateDictSource({self.path!r}, {len(self._tensors)} tensors)"


class TallExpertSource:
    """Expert ``task`` of a TALL-masks bundle, read as a model: θ̂_t = θ_0 + m_t ⊙ τ_MTL for
    every masked tensor (float32, cast to θ_0's dtype: :func:`rebuild_values`), θ_0's own tensor
    for the others. A slice reads the same band of θ_0, τ_MTL and the packed mask (an eighth
    of a byte per element) and rebuilds it alone, so the engine's sliced and fused strategies
    stay bounded; the bits are those of the whole tensor.

    The parts are any tensor sources: a bundle folder's checkpoints (:func:`open_tall_expert`)
    or an in-memory bundle's dicts (``modelalloy.bundle.TallBundle``)."""

    def __init__(self, label: str, base: TensorSource, merged: TensorSource, masks: TensorSource,
                 shapes: Mapping[str, tuple[int, ...]], index: int,
                 owned: Any = None, model_files_dir: Path | None = None):
        self.path = label
        self.model_files_dir = model_files_dir  # config and tokenizer files, for an output
        self._base, self._merged, self._masks = base, merged, masks
        self._shapes = shapes
        self._index = index
        self._owned = owned  # closed with this source (an opened bundle folder)
        self._names: set[str] | None = None

    @property
    def config(self) -> dict[str, Any] | None:
        return self._base.config

    def names(self) -> list[str]:
        return self._base.names()

    def __contains__(self, name: object) -> bool:
        if self._names is None:
            self._names = set(self._base.names())
        return name in self._names

    def info(self, name: str) -> Any:
        return self._base.info(name)

    def get(self, name: str) -> torch.Tensor:
        base = self._base.get(name)
        if name not in self._shapes:
            return base
        mask = unpack_bits(self._masks.get(mask_key(self._index, name)), base.numel())
        return rebuild_values(base, mask.view(base.shape), self._merged.get(name))

    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. start + out.numel()`` of the flattened θ̂_t, into ``out`` (a 1-D
        buffer of θ_0's dtype)."""
        self._base.get_slice(name, start, out)
        if name not in self._shapes:
            return out
        count = out.numel()
        merged = torch.empty(count, dtype=self._merged.info(name).dtype)
        self._merged.get_slice(name, start, merged)
        first, stop = start // 8, -(-(start + count) // 8)  # the bytes holding the band's bits
        bits = self._masks.get_slice(mask_key(self._index, name), first,
                                     torch.empty(stop - first, dtype=torch.uint8))
        mask = unpack_bits(bits, count, skip=start - 8 * first)
        return out.copy_(rebuild_values(out, mask, merged))

    def prefetch(self, name: str) -> bool:
        hinted = self._base.prefetch(name)
        if name in self._shapes:
            self._merged.prefetch(name)
        return hinted

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> TallExpertSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TallExpertSource({self.path!r})"


def open_tall_expert(folder: str | Path, task: str | int, label: str | None = None
                     ) -> TallExpertSource:
    """Expert ``task`` (its name or 0-based index) of the bundle folder ``folder``, checked
    against its manifest, as a tensor source (close it, or use it as a context manager)."""
    bundle = TallBundleFolder(folder)
    try:
        index = bundle.task_index(task)
        return TallExpertSource(label or f"{folder}#{bundle.tasks[index]}", bundle.base,
                                bundle.merged, bundle.masks, bundle.shapes, index,
                                owned=bundle, model_files_dir=bundle.path / "base")
    except BaseException:
        bundle.close()
        raise
