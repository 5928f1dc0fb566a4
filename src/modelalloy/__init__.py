"""modelalloy: merge fine-tuned neural networks.

Importing the package is cheap: ``merge`` and ``merge_state_dicts`` (and torch with them) are
imported on first use (PEP 562), so the command line can install its signal handlers before
the second or so that importing torch takes.
"""

import gc
import importlib
import os
import sys
from types import ModuleType

# Back torch's large CPU allocations with transparent huge pages. Merging allocates a fresh
# tensor-sized buffer for every cast and temporary, and first-touch page faults dominated:
# a bf16->fp32 cast of a 24.6M-element tensor took 138 ms with 4 KiB pages, 28 ms with huge
# pages (benchmarks/micro_ops.py). torch reads this once, at its first allocation, so it only
# takes effect when modelalloy is imported before torch allocates (always true for the CLI).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# A `modelalloy merge` start hints its first tensors' pages to the disk before torch is
# imported (about a second with the disk idle; early_hints uses the standard library only).
from modelalloy import early_hints  # noqa: E402

early_hints.start()

__version__ = "0.1.0"
__all__ = ["merge", "merge_state_dicts", "__version__"]


def import_with_gc_paused(name: str) -> ModuleType:
    """Import module ``name`` with the cyclic collector paused, then freeze what it made.

    Importing torch creates about a million objects, and the collector's passes over them
    are 0.3 s of a CLI start (2.1 s -> 1.8 s without them). Nothing in the import makes
    cycles worth collecting, so the collector is paused for it and restored as it was; the
    objects are then frozen (moved out of the collector's generations), or the first full
    collection after the import walks them all anyway: 0.1-0.2 s, which landed in whatever
    was imported next.
    """
    if name in sys.modules:  # imported already: nothing to pause for, nothing new to freeze
        return sys.modules[name]
    collecting = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def __getattr__(name: str) -> object:
    if name in ("merge", "merge_state_dicts"):
        return getattr(import_with_gc_paused("modelalloy.api"), name)
    raise AttributeError(f"module 'modelalloy' has no attribute {name!r}")
