"""A TALL-masks bundle folder, read: its checked parts and the packed masks' bits.

The folder (written by :func:`modelalloy.bundle.compress_to`) holds ``bundle.json``, ``base/``
(θ_0), ``merged/`` (τ_MTL per masked tensor) and ``masks/`` (``"<task index>/<tensor>"`` ->
the mask m_t packed 8 coordinates to a byte, numpy's big-endian bit order). Every file is
checked against the manifest before a tensor is trusted (:mod:`modelalloy.io.tall_manifest`).

Expert t is rebuilt as θ̂_t = θ_0 + m_t ⊙ τ_MTL (:func:`rebuild_values`); the engine reads it
as a model through :class:`modelalloy.engine.sources.TallExpertSource`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import Checkpoint, open_checkpoint
from modelalloy.io.tall_manifest import read_manifest, verify_files, verify_tensors

# the keys of bundle.json's "config" (modelalloy.bundle.TallConfig's fields)
CONFIG_FIELDS = ("base_merge", "mask_lambda", "density", "scope")


def unpack_bits(bits: torch.Tensor, count: int, skip: int = 0) -> torch.Tensor:
    """Booleans ``skip .. skip + count`` of packed ``bits`` (uint8, 1-D, numpy bit order)."""
    flat = np.unpackbits(bits.numpy(), count=skip + count).astype(bool)
    return torch.from_numpy(flat[skip:])


def rebuild_values(base: torch.Tensor, mask: torch.Tensor, merged: torch.Tensor
                   ) -> torch.Tensor:
    """θ̂_t = θ_0 + m_t ⊙ τ_MTL in float32, cast back to θ_0's dtype (elementwise: the same bits
    for a whole tensor or any slice of it)."""
    values = base.to(torch.float32) + mask.to(torch.float32) * merged.to(torch.float32)
    return values.to(base.dtype)


class TallBundleFolder:
    """The three checked parts of a bundle folder, open until :meth:`close`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        meta = read_manifest(path, CONFIG_FIELDS)
        verify_files(path, meta["files"])
        self.path = path
        self.tasks: list[str] = list(meta["tasks"])
        self.config: dict[str, Any] = dict(meta["config"])
        self.shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        self.base = open_checkpoint(path / "base")
        parts: list[Checkpoint] = [self.base]
        try:
            self.merged = open_checkpoint(path / "merged")
            parts.append(self.merged)
            self.masks = open_checkpoint(path / "masks")
            parts.append(self.masks)
            verify_tensors(path, self.tasks, self.shapes, self.base, self.merged, self.masks)
        except BaseException:
            for ck in parts:
                ck.close()
            raise

    def task_index(self, task: str | int) -> int:
        """The 0-based index of ``task``: its name, or its index ("2" is the third task,
        unless a task is named "2")."""
        if isinstance(task, str) and task not in self.tasks and task.isdigit():
            task = int(task)
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise CheckpointError(f"{self.path}: task index {task} out of range: the "
                                      f"bundle has {len(self.tasks)} tasks "
                                      f"({', '.join(self.tasks)})")
            return task
        if task not in self.tasks:
            raise CheckpointError(f"{self.path}: unknown task '{task}'; the bundle has: "
                                  f"{', '.join(self.tasks)}")
        return self.tasks.index(task)

    def close(self) -> None:
        for ck in (self.base, self.merged, self.masks):
            ck.close()

    def __enter__(self) -> TallBundleFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mask_key(index: int, name: str) -> str:
    """The masks part's tensor name of task ``index``'s mask of tensor ``name``."""
    return f"{index}/{name}"
