"""A model read with a LoRA adapter applied, one tensor (or slice) at a time.

:class:`AdaptedCheckpoint` is a :class:`Checkpoint` of the model whose ``get`` and
``get_slice`` return ``W + s·B·A`` for the adapted tensors (computed in float32, rounded once
to the stored dtype) and the adapter's saved tensor for replaced ones. A slice costs the band
of rows it covers (``B[rows]·A``), so the engine's sliced merges stay bounded. Everything that
reads a Checkpoint (the planner, the engine, inspect) takes it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelalloy.io.checkpoint import Checkpoint, open_checkpoint
from modelalloy.io.lora.adapter import LoraAdapter, open_adapter


class AdaptedCheckpoint(Checkpoint):
    """The tensors of ``model`` with ``adapter`` applied (see the module docstring)."""

    def __init__(self, model: Checkpoint, adapter: LoraAdapter) -> None:
        # Same files and headers as the opened model; this object reads them itself.
        super().__init__(model.path, model.config, model._infos, model._tensors,
                         model._offsets)
        adapter.bind(model.path, self._infos)
        self.adapter = adapter

    def _stored(self, name: str, out: torch.Tensor | None) -> torch.Tensor:
        """W: the model's tensor, or the adapter's saved copy (modules_to_save, embeddings)."""
        replaced = self.adapter.replacements.get(name)
        if replaced is None:
            return super().get(name, out)
        t = self.adapter.weights.get(replaced).to(self.info(name).dtype)
        return t if out is None else out.copy_(t)

    def _bias_delta(self, name: str) -> torch.Tensor:
        key, scale = self.adapter.biases[name]
        return self.adapter.weights.get(key).to(torch.float32) * scale

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._stored(name, out)
        term = self.adapter.terms.get(name)
        if term is None and name not in self.adapter.biases:
            return tensor
        if term is None:
            delta = self._bias_delta(name)
        else:
            delta = term.delta(self.adapter.weights.get(term.a_name),
                               self.adapter.weights.get(term.b_name))
        merged = delta.add_(tensor.to(torch.float32))  # delta is ours to overwrite
        # Not in place when we were handed the stored tensor itself (pickles): it is shared.
        return merged.to(tensor.dtype) if out is None else out.copy_(merged)

    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        if name in self.adapter.replacements:  # small tensors (heads, embeddings): read whole
            return out.copy_(self.get(name).reshape(-1)[start:start + out.numel()])
        got = super().get_slice(name, start, out)
        if name in self.adapter.biases:
            delta = self._bias_delta(name)[start:start + out.numel()]
            return got.copy_(delta.add_(got.to(torch.float32)))
        term = self.adapter.terms.get(name)
        if term is None:
            return got
        cols = self.info(name).shape[1]
        first, stop = start // cols, -(-(start + out.numel()) // cols)
        band = term.delta(self.adapter.weights.get(term.a_name),
                          self.adapter.weights.get(term.b_name), slice(first, stop))
        offset = start - first * cols
        delta = band.reshape(-1)[offset:offset + out.numel()]
        return got.copy_(delta.add_(got.to(torch.float32)))

    def prefetch(self, name: str) -> bool:
        return False if name in self.adapter.replacements else super().prefetch(name)

    def close(self) -> None:
        self.adapter.close()
        super().close()

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({str(self.path)!r} + {str(self.adapter.path)!r})"


def open_model(model: str | Path, adapter: str | Path | None = None) -> Checkpoint:
    """``open_checkpoint(model)``, with ``adapter`` (a PEFT LoRA folder) applied when given."""
    ckpt = open_checkpoint(model)
    if adapter is None:
        return ckpt
    try:
        return AdaptedCheckpoint(ckpt, open_adapter(adapter))
    except BaseException:
        ckpt.close()
        raise
