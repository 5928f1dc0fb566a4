"""PEFT LoRA adapters: read and apply them tensor by tensor, extract them, merge them.

- :mod:`.adapter`: an adapter folder (``adapter_config.json`` + weights) mapped onto the tensor
  names of its model; ``W' = W + s·B·A`` per targeted tensor (peft not needed).
- :mod:`.source`: a checkpoint that reads its model's tensors with the adapter applied.
- :mod:`.extract`: truncated SVD of (model − base) per weight, written as a PEFT adapter.
- :mod:`.combine`: adapters merged as adapters (peft's ``add_weighted_adapter`` combinations).
"""

from modelalloy.lora.adapter import LoraAdapter, LoraTerm, open_adapter
from modelalloy.lora.source import AdaptedCheckpoint, open_model

__all__ = ["AdaptedCheckpoint", "LoraAdapter", "LoraTerm", "open_adapter", "open_model"]
