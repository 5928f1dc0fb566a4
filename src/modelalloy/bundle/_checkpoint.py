"""Minimal safetensors folder reading/writing for the bundle commands.

Stand-in until modelalloy.io lands on main: reads every ``*.safetensors`` file of a folder (or
one file), writes one ``model.safetensors`` plus the folder's small side files (config,
tokenizer). No pickle is ever loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modelalloy.errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
SIDE_FILE_LIMIT = 64 * 1024 * 1024


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.safetensors"))
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file found (only safetensors is read; "
                              "convert .bin checkpoints first)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: not a readable safetensors file ({err})") from err
        dup = set(part) & set(out)
        if dup:
            raise CheckpointError(f"{f}: tensor '{sorted(dup)[0]}' also appears in another shard")
        out.update(part)
    return out


def side_files(folder: str | Path) -> list[Path]:
    """The small non-weight files of a model folder (config.json, tokenizer files, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json") and p.stat().st_size <= SIDE_FILE_LIMIT]


def save_model_folder(state: dict[str, torch.Tensor], out: str | Path,
                      copy_from: list[Path] | None = None) -> Path:
    """Write ``model.safetensors`` (and side files) to a temporary sibling, then rename."""
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output folder")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    for f in copy_from or []:
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out
