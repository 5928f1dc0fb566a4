"""Checkpoint reading and writing for the bundle and streaming commands, on modelalloy.io.

:func:`lazy_state` wraps a validated checkpoint (safetensors folders with or without a shard
index, single files, weights-only pickles) as a read-on-access mapping;
:func:`save_model_folder` writes sharded safetensors atomically and copies the model files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from modelalloy.io.checkpoint import Checkpoint, open_checkpoint
from modelalloy.io.model_files import copy_model_files
from modelalloy.io.writer import AtomicOutputDir, ShardedSafetensorsWriter

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
SIDE_FILE_LIMIT = 64 * 1024 * 1024
SHARD_BYTES = 5 * 1000 ** 3


class LazyState(Mapping[str, torch.Tensor]):
    """A checkpoint as a mapping: each access reads that tensor (stored dtype, CPU)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint:
            raise KeyError(name)
        return self.checkpoint.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.checkpoint

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.names())

    def __len__(self) -> int:
        return len(self.checkpoint)


def lazy_state(path: str | Path) -> LazyState:
    """Open a model folder or weight file (validated up front, nothing big read)."""
    return LazyState(open_checkpoint(path))


def side_files(folder: str | Path) -> list[Path]:
    """The small non-weight files of a model folder (config.json, tokenizer files, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json") and not p.name.endswith(".py")
            and p.stat().st_size <= SIDE_FILE_LIMIT]


def save_model_folder(state: Mapping[str, torch.Tensor], out: str | Path, *,
                      model_files_from: Path | None = None,
                      extra_files: Mapping[str, bytes] | None = None,
                      shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``state`` as sharded safetensors into ``out`` atomically, plus the model files of
    ``model_files_from`` (config, tokenizer; never Python files) and ``extra_files``."""
    out = Path(out)
    entries = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    with AtomicOutputDir(out) as tmp:
        writer = ShardedSafetensorsWriter(tmp, entries, shard_bytes)
        for n, t in state.items():
            writer.write(n, t)
        writer.close()
        if model_files_from is not None:
            copy_model_files(Path(model_files_from), tmp)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
    return out
