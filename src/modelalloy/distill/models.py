"""A distillation model folder: its module (from config.json, no remote code), weights and
tokenizer (local files only)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelalloy.distill.errors import DistillError


def load_model(folder: Path) -> tuple[nn.Module, Any]:
    """(module with the folder's weights, its tokenizer): local files only, no remote code."""
    from transformers import AutoTokenizer

    from modelalloy.io.checkpoint import read_state_dict
    from modelalloy.twin.folders import module_for_folder

    module = module_for_folder(folder)
    load_weights(module, read_state_dict(folder), folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DistillError(f"{folder}: no usable tokenizer ({str(err).splitlines()[0]})"
                           ) from None
    return module.eval(), tok


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], where: object) -> None:
    missing, unexpected = module.load_state_dict(dict(state), strict=False)
    tied = {n for n, _ in module.named_parameters()}
    bad = [m for m in missing if m in tied and not m.endswith("lm_head.weight")]
    if bad or unexpected:
        raise DistillError(f"{where}: weights do not fit the model (missing {bad[:3]}, "
                           f"unexpected {list(unexpected)[:3]})")
    if hasattr(module, "tie_weights"):
        module.tie_weights()
