"""Tiny Llama / Mistral / GPT-2 families for the mergekit-compatibility tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def _config(arch: str, layers: int, tie: bool):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                           max_position_embeddings=32, tie_word_embeddings=tie)
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                             max_position_embeddings=32, tie_word_embeddings=tie)
    from transformers import GPT2Config

    return GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=48, n_positions=32,
                      bos_token_id=1, eos_token_id=2)


def save_family(root: Path, arch: str = "llama", n_models: int = 2, layers: int = 4,
                seed: int = 0, scale: float = 0.05, tie: bool = False) -> list[Path]:
    """A base (``root/base``) and ``n_models`` fine-tunes (``root/m0`` ...): the base plus
    random deltas, saved as float32 HF folders. Returns [base, m0, m1, ...]."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch, layers, tie)
    base = AutoModelForCausalLM.from_config(config)
    folders = [root / "base"]
    base.save_pretrained(folders[0])
    for i in range(n_models):
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(root / f"m{i}")
        folders.append(root / f"m{i}")
    return folders


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
