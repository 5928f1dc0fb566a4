"""Exclusive knowledge compressed by truncated SVD (Twin-Merging, Lu et al., NeurIPS 2024).

For a 2-D tensor the exclusive knowledge of expert k is δ_k = θ_k − θ*. It is kept as its
best rank-r approximation (Eckart–Young)::

    δ_k = U Σ Vᵀ,   δ̂_k = U_r Σ_r V_rᵀ = up · down,   up = U_r Σ_r (m×r),  down = V_rᵀ (r×n)
    r = max(1, ⌊ρ · min(m, n)⌋)          ρ = density = 1 − mask_rate (paper: 0.1)
    ‖δ_k − δ̂_k‖_F² = Σ_{i>r} σ_i²         (the energy of the dropped singular values)

The official code (``sparsify.svd``) uses r = ⌊ρ·min(m, n)⌋ and drops the tensor when that is
0; we keep at least rank 1, which only differs on matrices narrower than 1/ρ (tiny models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modelalloy.errors import MethodError


@dataclass(frozen=True)
class LowRank:
    """δ̂ = up @ down: up is (m, r) = U_r Σ_r, down is (r, n) = V_rᵀ."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


def check_density(density: float) -> float:
    if not 0.0 < float(density) <= 1.0:
        raise MethodError(f"twin_merging: density must be in (0, 1], got {density}")
    return float(density)


def rank_for(shape: tuple[int, ...], density: float) -> int:
    """r = max(1, ⌊ρ · min(m, n)⌋) for a matrix of ``shape``."""
    full = min(shape)
    return max(1, min(full, math.floor(check_density(density) * full + 1e-9)))


def truncate(delta: torch.Tensor, density: float) -> LowRank:
    """The rank-r truncated SVD of a 2-D ``delta`` (float32), r from ``density``."""
    if delta.dim() != 2:
        raise MethodError(f"twin_merging: truncated SVD needs a 2-D tensor, got {delta.dim()}-D")
    d = delta.detach().to(torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = rank_for(tuple(d.shape), density)
    return LowRank(up=(u[:, :r] * s[:r]).contiguous(), down=vh[:r].contiguous())


def tail_energy(delta: torch.Tensor, rank: int) -> float:
    """Σ_{i>rank} σ_i² of ``delta``: the squared Frobenius error of its rank-``rank`` SVD."""
    s = torch.linalg.svdvals(delta.detach().to(torch.float64))
    return float((s[rank:] ** 2).sum())
