"""modelalloy: merge fine-tuned neural networks."""

from modelalloy.api import merge, merge_state_dicts

__version__ = "0.1.0"
__all__ = ["merge", "merge_state_dicts", "__version__"]
