"""In-memory models as engine sources: a state dict or a live torch module.

A :class:`StateDictSource` answers the planner and the executor exactly as a checkpoint on disk
does (:class:`modelalloy.plan.sources.TensorSource`), without copying: it holds detached views
of the caller's tensors, planning reads only their shapes and dtypes, and a slice is copied
straight from the tensor into the engine's cache-sized buffer (the disk path's ``preadv``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modelalloy.errors import CheckpointError


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
