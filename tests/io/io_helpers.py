"""Helpers shared by the io tests (a plain module: conftest names clash across folders)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch


def write_raw_safetensors(path: Path, header: dict, data: bytes, pad: bool = True) -> Path:
    """A safetensors file with exactly the header given (for corrupt-file tests)."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.w": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layers.0.b": torch.randn(8, generator=g).to(torch.float16),
        "layers.1.w": torch.randn(8, 8, generator=g),
        "steps": torch.tensor(7, dtype=torch.int64),
    }
