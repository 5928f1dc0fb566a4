"""Small synthetic state dicts for the advanced-method tests."""

from __future__ import annotations

import torch

NAMES = ["model.embed.weight", "model.layers.0.w.weight", "model.layers.1.w.weight",
         "model.layers.2.w.weight", "model.layers.2.norm.weight", "head.weight"]


def make_models(n_experts: int, seed: int = 0, shape=(4, 3), scale: float = 0.1,
                names=NAMES) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {}
    for n in names:
        shp = (shape[1],) if n.endswith("norm.weight") else shape
        base[n] = torch.randn(shp, generator=g)
    experts = []
    for _ in range(n_experts):
        experts.append({n: v + scale * torch.randn(v.shape, generator=g) for n, v in base.items()})
    return base, experts


def tv(base: dict, expert: dict) -> dict:
    return {n: expert[n] - base[n] for n in base}
