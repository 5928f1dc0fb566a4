"""modelalloy: merge fine-tuned neural networks."""

import gc
import os

# Back torch's large CPU allocations with transparent huge pages. Merging allocates a fresh
# tensor-sized buffer for every cast and temporary, and first-touch page faults dominated:
# a bf16->fp32 cast of a 24.6M-element tensor took 138 ms with 4 KiB pages, 28 ms with huge
# pages (benchmarks/micro_ops.py). torch reads this once, at its first allocation, so it only
# takes effect when modelalloy is imported before torch allocates (always true for the CLI).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Importing torch creates about a million objects, and the cyclic collector's passes over them
# are 0.3 s of a CLI start (2.1 s -> 1.8 s without them). Nothing in the import makes cycles
# worth collecting, so the collector is paused for it and restored as it was; the objects are
# then frozen (moved out of the collector's generations), or the first full collection after
# the import walks them all anyway: 0.1-0.2 s, which landed in whatever was imported next.
_collecting = gc.isenabled()
gc.disable()
try:
    from modelalloy.api import merge, merge_state_dicts
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

__version__ = "0.1.0"
__all__ = ["merge", "merge_state_dicts", "__version__"]
