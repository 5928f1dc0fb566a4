"""modelalloy: merge fine-tuned neural networks."""

import os

# Back torch's large CPU allocations with transparent huge pages. Merging allocates a fresh
# tensor-sized buffer for every cast and temporary, and first-touch page faults dominated:
# a bf16->fp32 cast of a 24.6M-element tensor took 138 ms with 4 KiB pages, 28 ms with huge
# pages (benchmarks/micro_ops.py). torch reads this once, at its first allocation, so it only
# takes effect when modelalloy is imported before torch allocates (always true for the CLI).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from modelalloy.api import merge, merge_state_dicts

__version__ = "0.1.0"
__all__ = ["merge", "merge_state_dicts", "__version__"]
