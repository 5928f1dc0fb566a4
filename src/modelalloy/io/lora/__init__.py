"""PEFT LoRA adapter folders at the I/O level: reading one and mapping it onto its model's
tensors (:mod:`.adapter`), a checkpoint read with it applied (:mod:`.source`), and writing
one (:mod:`.files`). The operations on adapters (extraction, merging) live in
:mod:`modelalloy.lora`."""

from modelalloy.io.lora.adapter import LoraAdapter, LoraTerm, open_adapter
from modelalloy.io.lora.source import AdaptedCheckpoint, open_model

__all__ = ["AdaptedCheckpoint", "LoraAdapter", "LoraTerm", "open_adapter", "open_model"]
