"""Fused slice kernels: one pass per slice for the sliced merges (optional, needs numba).

The engine merges elementwise and per-row methods a slice at a time (``engine.execute``). With
torch ops each step of a method is a pass over the slice; a fused kernel does the whole method
— the cast up from the stored dtype, the method, the cast down — in one pass, without the
float32 copies. Kernels are compiled by numba (``pip install modelalloy[fast]``) on first use
and cached on disk (``~/.cache/modelalloy/numba/<hash of these sources>``); without numba, or
with ``MODELALLOY_KERNELS=0``, the torch path runs.

Each kernel repeats its method's float32 operations in the torch path's order (``a + w·b`` as
one fused multiply-add, as torch's ``add(alpha=w)`` does), so outputs are bit-identical either
way (tests/kernels). Inputs: every source in bfloat16 or every source in float32; output
bfloat16 or float32. Anything else takes the torch path. ``interference.py`` holds the
passes of ``modelalloy inspect`` over float32 task vectors (tests/inspection).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def available() -> bool:
    """numba is installed and kernels are not switched off (``MODELALLOY_KERNELS=0``)."""
    if os.environ.get("MODELALLOY_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _numba_installed()


@functools.cache
def use_versioned_cache() -> None:
    """Point numba's on-disk cache at a folder named after a hash of this package's sources,
    unless NUMBA_CACHE_DIR is set. numba re-validates a cached kernel against its own file
    only, not the helpers inlined into it (``_numba.py``), so an edited helper could otherwise
    run stale machine code. Has no effect once numba has been imported."""
    if "NUMBA_CACHE_DIR" in os.environ or "numba" in sys.modules:
        return
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for source in sorted(here.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    os.environ["NUMBA_CACHE_DIR"] = str(root / "modelalloy" / "numba" / digest.hexdigest()[:16])


@functools.cache
def _numba_installed() -> bool:
    """numba imports (with its versioned cache folder): an installed numba that cannot
    import here (e.g. built for another NumPy) leaves the torch path, with a warning."""
    if importlib.util.find_spec("numba") is None:
        return False
    use_versioned_cache()
    try:
        import numba  # noqa: F401
    except Exception as error:  # any import-time failure of an optional accelerator
        warnings.warn(f"numba is installed but does not import ({error}); merging without "
                      "the fused kernels", RuntimeWarning, stacklevel=2)
        return False
    return True


def supports(source_dtypes: list[torch.dtype], out_dtype: torch.dtype) -> bool:
    """Whether the kernels handle these stored input dtypes and this output dtype."""
    return (len(set(source_dtypes)) == 1 and source_dtypes[0] in SUPPORTED_DTYPES
            and out_dtype in SUPPORTED_DTYPES)


def bits(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's storage as the kernels read it: uint16 for bfloat16."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()
