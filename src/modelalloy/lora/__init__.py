"""Operations on PEFT LoRA adapters (reading and applying them is :mod:`modelalloy.io.lora`):

- :mod:`.extract`: truncated SVD of (model − base) per weight, written as a PEFT adapter.
- :mod:`.combine`: adapters merged as adapters (peft's ``add_weighted_adapter`` rules).
- :mod:`.from_recipe`: a recipe of ``base+adapter`` models merged into one adapter.
"""

from modelalloy.io.lora import AdaptedCheckpoint, LoraAdapter, LoraTerm, open_adapter, open_model

__all__ = ["AdaptedCheckpoint", "LoraAdapter", "LoraTerm", "open_adapter", "open_model"]
