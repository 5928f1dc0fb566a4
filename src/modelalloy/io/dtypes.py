"""Dtype names <-> torch dtypes, for recipes, configs and the safetensors format.

``parse_dtype("bf16") -> torch.bfloat16``; ``dtype_name(torch.bfloat16) -> "bfloat16"``;
``SAFETENSORS_DTYPES["BF16"] -> torch.bfloat16`` and back with ``safetensors_code``.
"""

from __future__ import annotations

import torch

# Canonical name (what config.json's torch_dtype holds) -> dtype.
_CANONICAL: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}

_ALIASES: dict[str, str] = {
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "i64": "int64",
    "long": "int64",
    "i32": "int32",
    "int": "int32",
    "i16": "int16",
    "i8": "int8",
    "u8": "uint8",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}

# safetensors header codes (https://github.com/huggingface/safetensors, `Dtype`).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # torch >= 2.3
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)
        _CANONICAL[_attr] = getattr(torch, _attr)

_TO_CODE: dict[torch.dtype, str] = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}
_TO_NAME: dict[torch.dtype, str] = {dt: name for name, dt in _CANONICAL.items()}

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``, ``"bf16"``, ``"torch.float16"``, ``"fp32"`` ... -> torch dtype.

    Raises ``ValueError`` naming the accepted spellings for anything else.
    """
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a string such as 'bfloat16', got {name!r}")
    key = name.strip().lower()
    key = key.removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key in _CANONICAL:
        return _CANONICAL[key]
    known = ", ".join(sorted(set(_CANONICAL) | {"bf16", "fp16", "fp32"}))
    raise ValueError(f"unknown dtype {name!r}; use one of: {known}")


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of a dtype as written in config.json (``torch.bfloat16 -> "bfloat16"``)."""
    if dtype in _TO_NAME:
        return _TO_NAME[dtype]
    return str(dtype).removeprefix("torch.")


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code for a dtype (``torch.bfloat16 -> "BF16"``)."""
    try:
        return _TO_CODE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors by modelalloy") from None


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element (the writer asks for every slice it writes: no tensor is made)."""
    return dtype.itemsize
