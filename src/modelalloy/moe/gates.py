"""Router weights for an assembled MoE, one (experts × hidden) matrix per layer.

The router of layer l scores a token's hidden state h by ``g_e · h`` per expert e, so each
row g_e should point where expert e's tokens lie. As mergekit-moe does:

- ``hidden`` / ``hidden_last``: g_e = normalise(mean_p h_l(p) − mean_n h_l(n)), h_l(p) the
  base model's hidden state entering layer l at the prompt's last token, averaged over
  the expert's positive prompts p (and negative prompts n, when given);
- ``hidden_avg``: the same with h_l(p) averaged over the prompt's tokens;
- ``cheap_embed``: the same with the sum of the prompt tokens' input embeddings, one
  vector for every layer (no forward pass);
- ``random``: N(0, 1) entries; ``uniform_random``: U(−1/√hidden, 1/√hidden), nn.Linear's
  initialisation (seeded by the recipe's ``seed``).

``hidden*`` runs the base model once per prompt (transformers, the ``hf`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.moe.config import Expert


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _token_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = (tokenizer.bos_token or "") + prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def hidden_vectors(model, tokenizer, prompts: list[str], average: bool) -> torch.Tensor:
    """(layers, hidden): the mean over prompts of each layer's input hidden state (last
    token, or the mean over tokens when ``average``)."""
    total = None
    with torch.no_grad():
        for prompt in prompts:
            out = model(input_ids=_token_ids(tokenizer, prompt), output_hidden_states=True)
            states = torch.stack(out.hidden_states[:-1])[:, 0].float()  # (layers, seq, hidden)
            v = states.mean(1) if average else states[:, -1]
            total = v if total is None else total + v
    return total / len(prompts)


def embed_vector(embed: torch.Tensor, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(hidden,): normalised sum of the prompts' token embeddings."""
    ids = torch.cat([_token_ids(tokenizer, p)[0] for p in prompts])
    return _normalise(embed.float()[ids].sum(0))


def gate_weights(mode: str, base: Checkpoint, base_dir: Path, experts: list[Expert],
                 num_layers: int, hidden: int, seed: int = 0) -> torch.Tensor:
    """(layers, experts, hidden) router weights."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_layers, len(experts), hidden)
    if mode == "random":
        return torch.randn(shape, generator=g)
    if mode == "uniform_random":
        bound = 1 / math.sqrt(hidden)
        return torch.rand(shape, generator=g) * 2 * bound - bound
    from modelalloy.extras import require_extra

    require_extra("hf", f"moe (gate_mode {mode})")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{base_dir}: no usable tokenizer for gate_mode '{mode}' "
                              f"({' '.join(str(e).split())[:120]}); add the tokenizer files "
                              "to the base folder, or use gate_mode random") from None
    if mode == "cheap_embed":
        embed_name = next((n for n in base.names() if n.endswith("embed_tokens.weight")), None)
        if embed_name is None:
            raise CheckpointError(f"{base.path}: no embed_tokens weight for cheap_embed gates")
        embed = base.get(embed_name)

        def vector(prompts: list[str]) -> torch.Tensor:
            return embed_vector(embed, tokenizer, prompts).expand(num_layers, hidden)
    else:
        from transformers import AutoModelForCausalLM

        try:
            # base_dir was opened (and its weights validated) as ``base``; local files only
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                         local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{base_dir}: transformers cannot load the base for gate_mode "
                                  f"'{mode}' ({' '.join(str(e).split())[:120]})") from None

        def vector(prompts: list[str]) -> torch.Tensor:
            return hidden_vectors(model, tokenizer, prompts, average=mode == "hidden_avg")
    rows = []
    for expert in experts:
        v = vector(expert.positive_prompts)
        if expert.negative_prompts:
            v = v - vector(expert.negative_prompts)
        rows.append(_normalise(v))
    return torch.stack(rows, dim=1)
