"""Calibration data: prompt files for language models, tensor files for anything else.

Accepted files:

- ``.txt`` — one prompt per non-empty line;
- ``.jsonl`` — one JSON object per line: ``input_ids`` (a list of token ids: used as is, no
  tokenizer needed), or text under ``text`` / ``prompt`` / ``content`` (or ``--field``), with an
  optional ``response`` appended (teacher forcing of an expert's own answer);
- ``.safetensors`` / ``.pt`` — a tensor of inputs, first dimension = examples (key ``inputs``,
  or the only key); batches are slices of it (e.g. images for a vision suite).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import load_pickle, read_state_dict
from modelalloy.io.safe_read import open_regular

TEXT_FIELDS = ("text", "prompt", "content")
TENSOR_SUFFIXES = (".safetensors", ".pt")


def read_records(path: str | Path, field: str | None = None,
                 limit: int | None = None) -> list[str | list[int]]:
    """Prompts (str) or token id lists from a .txt or .jsonl file."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: no calibration data file")
    fd = open_regular(path, CheckpointError, "the calibration data")
    with os.fdopen(fd, encoding="utf-8") as fh:
        try:
            head = os.pread(fd, 2, 0)
            return _records(path, fh, field, limit, head)
        except UnicodeDecodeError:
            raise CheckpointError(_binary(path, head)) from None


def _binary(path: Path, head: bytes) -> str:
    what = "gzip-compressed" if head == b"\x1f\x8b" else "binary"
    return (f"{path}: the calibration data is {what}, not UTF-8 text; give a .txt (a prompt "
            "per line) or .jsonl file" + (" (decompress it first)" if what != "binary" else ""))


def _token_ids(path: Path, lineno: int, ids: object) -> list[int]:
    if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise CheckpointError(f"{path}:{lineno}: input_ids must be a list of non-negative "
                              "integer token ids")
    return ids


def _records(path: Path, fh: Any, field: str | None, limit: int | None,
             head: bytes) -> list[str | list[int]]:
    out: list[str | list[int]] = []
    for lineno, line in enumerate(fh, 1):
        if limit is not None and len(out) >= limit:
            break
        line = line.rstrip("\n")
        if "\0" in line:
            raise CheckpointError(_binary(path, head))
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise CheckpointError(f"{path}:{lineno}: JSON nested too deeply") from None
        if isinstance(obj, dict) and "input_ids" in obj and field is None:
            out.append(_token_ids(path, lineno, obj["input_ids"]))
            continue
        keys = (field,) if field else TEXT_FIELDS
        text = next((obj[k] for k in keys if isinstance(obj, dict) and k in obj), None)
        if not isinstance(text, str):
            raise CheckpointError(f"{path}:{lineno}: no text field "
                                  f"({' / '.join(keys)}) in this record")
        if isinstance(obj.get("response"), str):
            text = text + obj["response"]
        out.append(text)
    if not out:
        raise CheckpointError(f"{path}: no calibration example in this file")
    return out


def token_batches(records: Sequence[str | list[int]], tokenizer: Any = None, *,
                  batch_size: int = 8, max_length: int = 512,
                  pad_token_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded ``input_ids`` / ``attention_mask`` batches."""
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        if all(isinstance(r, list) for r in chunk):
            seqs = [list(r)[:max_length] for r in chunk]
        else:
            if tokenizer is None:
                raise CheckpointError("text prompts need a tokenizer (none found next to the "
                                      "model); or give pre-tokenized JSONL with input_ids")
            seqs = [tokenizer(r if isinstance(r, str) else tokenizer.decode(r),
                              truncation=True, max_length=max_length)["input_ids"]
                    for r in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def tensor_batches(path: str | Path, *, batch_size: int = 32,
                   limit: int | None = None) -> list[torch.Tensor]:
    """Slices of the input tensor stored in a .safetensors or .pt file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors = read_state_dict(path)
    else:
        loaded = load_pickle(path)  # a bare tensor, or a dict of them
        tensors = {"inputs": loaded} if isinstance(loaded, torch.Tensor) else loaded
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor)
                                                    for v in tensors.values()):
            raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a tensor or "
                                  "a dict of tensors")
    if "inputs" in tensors:
        x = tensors["inputs"]
    elif len(tensors) == 1:
        x = next(iter(tensors.values()))
    else:
        raise CheckpointError(f"{path}: several tensors and none named 'inputs'")
    if limit is not None:
        x = x[:limit]
    return [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]


def load_calibration(path: str | Path, tokenizer: Any = None, *, batch_size: int = 8,
                     max_length: int = 512, limit: int | None = None,
                     field: str | None = None) -> list[Any]:
    """Batches from any accepted calibration file (see the module docstring)."""
    path = Path(path)
    if path.suffix in TENSOR_SUFFIXES:
        return tensor_batches(path, batch_size=batch_size, limit=limit)
    records = read_records(path, field=field, limit=limit)
    pad = 0
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id or 0)
    return token_batches(records, tokenizer, batch_size=batch_size, max_length=max_length,
                         pad_token_id=pad)
