"""What the planner and the engine read models through: a :class:`TensorSource`.

Two kinds exist: a checkpoint on disk (:class:`modelalloy.io.checkpoint.Checkpoint`) and tensors
already in memory (:class:`modelalloy.engine.sources.StateDictSource`: a state dict or a live
torch module). Both answer the same questions, so one planner and one executor serve every
path: names and per-tensor metadata without reading data (planning), whole tensors in their
stored dtype (``get``), and flat slices into a caller's buffer (``get_slice``, the sliced and
fused strategies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class TensorMeta(Protocol):
    """What is known about a tensor without reading it."""

    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def nbytes(self) -> int: ...


class TensorSource(Protocol):
    """One model's tensors, read one at a time. Every read is thread-safe."""

    @property
    def path(self) -> Path | str:
        """Where the model comes from, for messages: a folder or file on disk, or a label such
        as "in-memory model 'math'"."""
    @property
    def config(self) -> dict[str, Any] | None:
        """The HF config, when there is one."""

    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorMeta: ...
    def get(self, name: str) -> torch.Tensor: ...
    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor: ...
    def prefetch(self, name: str) -> bool: ...
