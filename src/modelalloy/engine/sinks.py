"""Where merged tensors go, besides the sharded safetensors writer (``modelalloy.io.writer``).

Both sinks take tensors whole (``write``) or in flat parts (``begin``, ``write_part``, ``end``:
the sliced and fused strategies), from any thread, on the merge device (``wants_cpu`` is
False: a CUDA merge of CUDA tensors stays on the GPU).

- :class:`StateDictSink` collects a new state dict, each tensor on its reference tensor's
  device; it never hands back storage shared with a source.
- :class:`ModuleSink` copies each tensor into a live module's existing parameter or buffer
  storage (``torch.no_grad``, ``copy_``: same objects, same storages, their dtype kept), so a
  candidate merged again and again into one module allocates no second model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from modelalloy.errors import PlanError


class StateDictSink:
    """Collects the merged tensors as a state dict (``result``), in plan order."""

    wants_cpu = False

    def __init__(self, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 devices: Mapping[str, torch.device], source_storages: Iterable[int] = ()):
        self._layout = {name: (shape, dtype) for name, shape, dtype in layout}
        self._devices = devices
        self._parts: dict[str, torch.Tensor] = {}
        self._done: dict[str, torch.Tensor] = {}
        # storages of the inputs: an output that would share one (a copied integer buffer, a
        # method returning an input unchanged) is cloned, so editing the result never edits
        # a source
        self._source_storages = set(source_storages)  # untyped_storage().data_ptr()

    def _owned(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self._devices[name])
        if tensor.untyped_storage().data_ptr() in self._source_storages:
            tensor = tensor.clone()
        return tensor

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._done[name] = self._owned(name, tensor)

    def begin(self, name: str) -> None:
        shape, dtype = self._layout[name]
        numel = 1
        for d in shape:
            numel *= d
        self._parts[name] = torch.empty(numel, dtype=dtype, device=self._devices[name])

    def write_part(self, name: str, start: int, part: torch.Tensor) -> None:
        self._parts[name][start:start + part.numel()].copy_(part.reshape(-1))

    def end(self, name: str) -> None:
        self._done[name] = self._parts.pop(name).view(self._layout[name][0])

    def abandon(self, name: str) -> None:
        self._parts.pop(name, None)

    def result(self) -> dict[str, torch.Tensor]:
        """The merged state dict, in plan order."""
        return {name: self._done[name] for name in self._layout}


class ModuleSink:
    """Copies merged tensors into a live module's parameters and buffers, in place."""

    wants_cpu = False

    def __init__(self, module: torch.nn.Module,
                 layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]]):
        targets = module.state_dict(keep_vars=True)
        layout = list(layout)
        names = {name for name, _, _ in layout}
        missing = [name for name, _, _ in layout if name not in targets]
        # a tied tensor (an lm_head sharing the embedding's weight) is filled through the one
        # the merge makes: the checkpoints store it once
        merged = {id(targets[name]) for name in names if name in targets}
        extra = [name for name in targets if name not in names
                 and id(targets[name]) not in merged]
        if missing or extra:
            what = (f"lacks {len(missing)} merged tensor(s), e.g. '{missing[0]}'" if missing
                    else f"has {len(extra)} tensor(s) the merge does not make, e.g. "
                         f"'{extra[0]}'")
            raise PlanError(f"into: the {type(module).__name__} {what}; pass a module of the "
                            "merged models' architecture")
        for name, shape, _ in layout:
            if tuple(targets[name].shape) != tuple(shape):
                raise PlanError(f"into: tensor '{name}' is {list(targets[name].shape)} in the "
                                f"{type(module).__name__} but the merge makes {list(shape)}")
        self._targets = {name: targets[name] for name in names}
        self._parts: dict[str, torch.Tensor] = {}
        self.module = module

    def write(self, name: str, tensor: torch.Tensor) -> None:
        target = self._targets[name]
        with torch.no_grad():
            target.copy_(tensor.view(target.shape))

    def begin(self, name: str) -> None:
        target = self._targets[name]
        if not target.is_contiguous():  # parts are flat: gather them, copy at the end
            self._parts[name] = torch.empty(target.numel(), dtype=target.dtype,
                                            device=target.device)

    def write_part(self, name: str, start: int, part: torch.Tensor) -> None:
        gathered = self._parts.get(name)
        flat = gathered if gathered is not None else self._targets[name].detach().view(-1)
        with torch.no_grad():
            flat[start:start + part.numel()].copy_(part.reshape(-1))

    def end(self, name: str) -> None:
        gathered = self._parts.pop(name, None)
        if gathered is not None:
            self.write(name, gathered)

    def abandon(self, name: str) -> None:
        self._parts.pop(name, None)
