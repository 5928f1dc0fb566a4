"""Fused slice kernels: one pass per slice for the sliced merges (optional, needs numba).

The engine merges elementwise and per-row methods a slice at a time (``engine.execute``). With
torch ops each step of a method is a pass over the slice; a fused kernel does the whole method
— the cast up from the stored dtype, the method, the cast down — in one pass, without the
float32 copies. Kernels are compiled by numba (``pip install modelalloy[fast]``) on first use
and cached on disk; without numba, or with ``MODELALLOY_KERNELS=0``, the torch path runs.

Each kernel repeats its method's float32 operations in the torch path's order (``a + w·b`` as
one fused multiply-add, as torch's ``add(alpha=w)`` does), so outputs are bit-identical either
way (tests/kernels). Inputs: every source in bfloat16 or every source in float32; output
bfloat16 or float32. Anything else takes the torch path.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def available() -> bool:
    """numba is installed and kernels are not switched off (``MODELALLOY_KERNELS=0``)."""
    if os.environ.get("MODELALLOY_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _numba_installed()


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def supports(source_dtypes: list[torch.dtype], out_dtype: torch.dtype) -> bool:
    """Whether the kernels handle these stored input dtypes and this output dtype."""
    return (len(set(source_dtypes)) == 1 and source_dtypes[0] in SUPPORTED_DTYPES
            and out_dtype in SUPPORTED_DTYPES)


def bits(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's storage as the kernels read it: uint16 for bfloat16."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()
