"""Layer indices from tensor names, with no per-architecture tables, on real architectures."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from modelalloy.plan.layers import LayerIndexer, split_layer

N_LAYERS = 3


def tiny(kind: str) -> nn.Module:
    import transformers as tf

    common = dict(num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, num_key_value_heads=2,
                                                  **common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=64, num_key_value_heads=2,
                                                  **common))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(vocab_size=64, num_key_value_heads=2,
                                                      **common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=4,
                                                vocab_size=64, n_positions=16))
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=64, max_position_embeddings=16, **common))
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(image_size=8, patch_size=4, **common))
    raise ValueError(kind)


# Where each architecture keeps its blocks: an independent, hand-written pattern per model.
BLOCK_PATTERN = {
    "llama": r"^model\.layers\.(\d+)\.",
    "qwen2": r"^model\.layers\.(\d+)\.",
    "mistral": r"^model\.layers\.(\d+)\.",
    "gpt2": r"^transformer\.h\.(\d+)\.",
    "bert": r"^encoder\.layer\.(\d+)\.",
    "vit": r"^(?:encoder\.layer|layers)\.(\d+)\.",  # transformers 4.x / 5.x names
}


@pytest.mark.parametrize("kind", sorted(BLOCK_PATTERN))
def test_every_tensor_gets_its_block(kind):
    names = list(tiny(kind).state_dict())
    indexer = LayerIndexer(names)
    pattern = re.compile(BLOCK_PATTERN[kind])
    inside = 0
    for name in names:
        found = pattern.match(name)
        layer, count = indexer.lookup(name)
        if found:
            inside += 1
            assert (layer, count) == (int(found.group(1)), N_LAYERS), name
        else:
            assert layer is None, name  # embeddings, final norm, heads, pooler
    assert inside > 0
    assert indexer.max_layers == N_LAYERS


def test_plain_sequential_ranks_its_children():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 2))
    indexer = LayerIndexer(model.state_dict())
    assert [indexer.lookup(f"{i}.weight") for i in (0, 2, 4)] == [(0, 3), (1, 3), (2, 3)]


def test_stacks_are_counted_apart_and_moe_takes_the_first_number():
    names = ["encoder.block.0.w", "encoder.block.1.w", "decoder.block.0.w",
             "model.layers.3.mlp.experts.7.w1.weight", "model.layers.0.mlp.w",
             "lm_head.weight", "conv1.weight"]
    indexer = LayerIndexer(names)
    assert indexer.lookup("encoder.block.1.w") == (1, 2)
    assert indexer.lookup("decoder.block.0.w") == (0, 1)
    # model.layers has children 0 and 3: ranked 0 and 1 of 2
    assert indexer.lookup("model.layers.3.mlp.experts.7.w1.weight") == (1, 2)
    assert split_layer("model.layers.3.mlp.experts.7.w1.weight") == ("model.layers", 3)
    assert indexer.lookup("lm_head.weight")[0] is None
    assert split_layer("conv1.weight") is None


def test_ranks_do_not_depend_on_name_order():
    names = [f"h.{i}.w" for i in range(12)]
    forward = LayerIndexer(names)
    backward = LayerIndexer(list(reversed(names)))
    assert all(forward.lookup(n) == backward.lookup(n) for n in names)
    assert torch.tensor([forward.lookup(n)[0] for n in names]).tolist() == list(range(12))
