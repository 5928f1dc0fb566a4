"""Tiny models and PEFT adapters built inside the tests (peft only where it is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  r: int, alpha: float, extra: dict[str, torch.Tensor] | None = None,
                  **config) -> Path:
    """A PEFT-format adapter by hand: ``factors`` maps a module name to (A, B)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    for name, t in (extra or {}).items():
        tensors[f"base_model.model.{name}"] = t.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}), **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def peft_adapter(model, folder: Path, seed: int, **lora_kwargs) -> Path:
    """A random (non-zero B) peft LoRA adapter of ``model`` saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # modules_to_save start as copies: make them differ (as if trained)
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


def merged_with_peft(model_dir: Path, adapter_dir: Path, model_cls) -> dict[str, torch.Tensor]:
    """peft's own merge_and_unload of ``adapter_dir`` into ``model_dir``'s model."""
    from peft import PeftModel

    model = model_cls.from_pretrained(model_dir)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
