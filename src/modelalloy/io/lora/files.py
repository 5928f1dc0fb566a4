"""Writing a PEFT LoRA adapter folder: weights, ``adapter_config.json`` and a card, atomically."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modelalloy.io.lora.adapter import CONFIG_FILE, PEFT_PREFIX
from modelalloy.io.writer import AtomicOutputDir, check_output_path


def adapter_config(*, ranks: dict[str, int], alphas: dict[str, float],
                   modules_to_save: list[str], fan_in_fan_out: bool = False,
                   base_model: str | None = None, use_rslora: bool = False,
                   lora_bias: bool = False) -> dict[str, Any]:
    """A peft LoraConfig as JSON: every module named in full in ``target_modules``, its rank
    and alpha in ``rank_pattern``/``alpha_pattern`` (keys escaped: peft reads them as regular
    expressions matched against the end of the module name)."""
    r = max(ranks.values(), default=1)
    alpha = max(alphas.values(), default=1)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
        "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
        "target_modules": sorted(ranks), "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "lora_bias": lora_bias, "layers_to_transform": None, "layers_pattern": None,
    }


def lora_key(module: str, part: str, embedding: bool) -> str:
    """peft's saved name of a LoRA factor (``part`` is "A" or "B")."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_{part}"
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def write_adapter_folder(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                         card: str, *, inputs: list[Path], force: bool = False) -> Path:
    """``out/adapter_model.safetensors`` + ``adapter_config.json`` + ``README.md``; the folder
    appears only when complete."""
    out = Path(out)
    check_output_path(out, inputs, force)
    with AtomicOutputDir(out, force=force) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (Path(tmp) / "README.md").write_text(card)
    return out
