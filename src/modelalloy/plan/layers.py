"""Find each tensor's layer (block) index from its name, with no per-architecture tables.

A layer stack in a PyTorch state dict is a ``ModuleList``/``Sequential``: its children are named
by integers. So the block of a tensor is the first purely numeric component of its dotted name,
and the stack is everything before it::

    model.layers.12.self_attn.q_proj.weight   -> stack "model.layers", index 12   (Llama, Qwen)
    transformer.h.3.attn.c_attn.weight        -> stack "transformer.h", index 3   (GPT-2)
    bert.encoder.layer.5.output.dense.weight  -> stack "bert.encoder.layer", 5    (BERT, ViT)
    model.layers.3.mlp.experts.7.w1.weight    -> stack "model.layers", index 3    (MoE: first wins)
    model.embed_tokens.weight, lm_head.weight -> no layer                         (outside)

Indices are ranked within their stack (a Sequential of Linear/ReLU has children 0, 2, 4, which
become layers 0, 1, 2 of 3), and each stack counts its own layers (encoder and decoder apart).
"""

from __future__ import annotations

from collections.abc import Iterable


def split_layer(name: str) -> tuple[str, int] | None:
    """Return (stack prefix, raw integer index) for a tensor name, or None outside any stack."""
    parts = name.split(".")
    # The last component is the parameter itself ("weight", "bias"); never an index.
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


class LayerIndexer:
    """Maps tensor names to (layer index, number of layers in its stack)."""

    def __init__(self, names: Iterable[str]):
        raw: dict[str, set[int]] = {}
        for name in names:
            found = split_layer(name)
            if found is not None:
                raw.setdefault(found[0], set()).add(found[1])
        self._rank = {stack: {idx: r for r, idx in enumerate(sorted(ids))}
                      for stack, ids in raw.items()}

    def lookup(self, name: str) -> tuple[int | None, int | None]:
        """(layer index, layer count of its stack); (None, deepest stack's count) outside."""
        found = split_layer(name)
        if found is None or found[0] not in self._rank:
            return None, self.max_layers
        ranks = self._rank[found[0]]
        return ranks[found[1]], len(ranks)

    @property
    def max_layers(self) -> int | None:
        return max((len(r) for r in self._rank.values()), default=None)
