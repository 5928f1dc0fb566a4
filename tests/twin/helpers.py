"""Tiny modules for the Twin-Merging tests: every branch kind in a few hundred weights."""

from __future__ import annotations

import torch
from torch import nn


class Custom(nn.Module):
    """Uses its weight in its own way (no side-branch rule): the fallback path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * 0.3)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight.T) * self.scale


class Tiny(nn.Module):
    """ids (B, T) -> (B, T, 5): Embedding, Linear, LayerNorm, Custom, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.fc = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.custom = Custom(8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.custom(self.norm(torch.relu(self.fc(self.emb(ids))))))


def family(n: int = 2, scale: float = 0.2, seed: int = 0
           ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    torch.manual_seed(seed)
    base = Tiny().state_dict()
    experts = {}
    for k in range(n):
        experts[f"t{k}"] = {name: t + scale * torch.randn_like(t) for name, t in base.items()}
    return base, experts


def task_batches(n_tasks: int, per_task: int = 24, seed: int = 0) -> dict[str, list]:
    """Token ids drawn from a different third of the vocabulary per task (easy to route)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in range(n_tasks):
        lo = 4 * k
        out[f"t{k}"] = [torch.randint(lo, lo + 4, (per_task, 5), generator=gen)]
    return out
