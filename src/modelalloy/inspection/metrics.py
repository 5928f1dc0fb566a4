"""Interference measures of one tensor's task vectors τ_i = θ_i − θ_0, kept as sums.

Every measure is a ratio of sums over elements, so a layer's or a family's value is the same
ratio of the summed sums (exactly what it would be on the concatenated tensors):

- norm_i = (Σ τ_i²)^½;  cosine_ij = Σ τ_i τ_j / (norm_i · norm_j);
- sign-conflict rate: the share of elements where some τ_i > 0 and some τ_j < 0;
- TIES mask overlap: Jaccard |m_i ∧ m_j| / |m_i ∨ m_j| of the trim masks m_i (the
  k = ⌊density_i · numel⌋ largest |τ_i|, as TIES trims);
- TALL mask overlap: the same for m_i = 1[|τ_i| > λ·|τ_MTL − τ_i|], τ_MTL = Σ_j τ_j
  (Wang et al. 2024; λ = ``mask_lambda``, 0.6 by default);
- surviving share of expert i: Σ_{e kept} τ_i[e]² / Σ τ_i² — for ``ties``, kept = trimmed
  in and agreeing with the elected sign γ = sign(Σ_j τ̂_j) (``vote: weighted``: Σ_j w_j τ̂_j;
  zero → +); for ``dare_ties`` the expected share, density_i times the share agreeing with
  the vote of the whole vectors; ``dare_linear``: density_i; every other method: 1 (it drops
  nothing by sign or magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modelalloy.methods._sparsify import magnitude_trim_


@dataclass
class TensorSums:
    numel: int
    n: int
    sq: list[float]  # Σ τ_i²
    dot: list[list[float]]  # Σ τ_i τ_j
    conflicts: int
    ties_and: list[list[int]]
    ties_or: list[list[int]]
    tall_and: list[list[int]]
    tall_or: list[list[int]]
    kept_sq: list[float]  # Σ over surviving elements of τ_i²
    extra: dict = field(default_factory=dict)

    @staticmethod
    def zeros(n: int) -> TensorSums:
        grid = [[0] * n for _ in range(n)]
        return TensorSums(0, n, [0.0] * n, [[0.0] * n for _ in range(n)], 0,
                          [r[:] for r in grid], [r[:] for r in grid], [r[:] for r in grid],
                          [r[:] for r in grid], [0.0] * n)

    def add(self, other: TensorSums) -> None:
        self.numel += other.numel
        self.conflicts += other.conflicts
        for i in range(self.n):
            self.sq[i] += other.sq[i]
            self.kept_sq[i] += other.kept_sq[i]
            for j in range(self.n):
                self.dot[i][j] += other.dot[i][j]
                self.ties_and[i][j] += other.ties_and[i][j]
                self.ties_or[i][j] += other.ties_or[i][j]
                self.tall_and[i][j] += other.tall_and[i][j]
                self.tall_or[i][j] += other.tall_or[i][j]

    # -- the measures -------------------------------------------------------------------------

    def norms(self) -> list[float]:
        return [s ** 0.5 for s in self.sq]

    def cosine(self, i: int, j: int) -> float:
        den = (self.sq[i] * self.sq[j]) ** 0.5
        return self.dot[i][j] / den if den else 0.0

    def conflict_rate(self) -> float:
        return self.conflicts / self.numel if self.numel else 0.0

    def ties_overlap(self, i: int, j: int) -> float:
        return self.ties_and[i][j] / self.ties_or[i][j] if self.ties_or[i][j] else 0.0

    def tall_overlap(self, i: int, j: int) -> float:
        return self.tall_and[i][j] / self.tall_or[i][j] if self.tall_or[i][j] else 0.0

    def surviving(self, i: int) -> float:
        return self.kept_sq[i] / self.sq[i] if self.sq[i] else 0.0

    def pairs(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.n) for j in range(i + 1, self.n)]


def _pair_counts(masks: list[torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    n = len(masks)
    both = [[0] * n for _ in range(n)]
    either = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            both[i][j] = int((masks[i] & masks[j]).sum())
            either[i][j] = int((masks[i] | masks[j]).sum())
    return both, either


def tensor_sums(taus: list[torch.Tensor], *, weights: list[float], densities: list[float],
                mask_lambda: float, method: str, vote: str = "paper") -> TensorSums:
    """The sums of one tensor (τ_i flattened float32, one per expert)."""
    n = len(taus)
    flat = torch.stack([t.reshape(-1).to(torch.float32) for t in taus])
    dots = (flat.double() @ flat.double().T).tolist()
    positive = (flat > 0).any(0)
    negative = (flat < 0).any(0)
    trimmed = [magnitude_trim_(flat[i].clone(), densities[i]) for i in range(n)]
    ties_masks = [t != 0 for t in trimmed]
    mtl = flat.sum(0)
    tall_masks = [flat[i].abs() > mask_lambda * (mtl - flat[i]).abs() for i in range(n)]
    ties_and, ties_or = _pair_counts(ties_masks)
    tall_and, tall_or = _pair_counts(tall_masks)
    sq = [dots[i][i] for i in range(n)]
    if method in ("ties", "dare_ties"):
        # TIES votes with the trimmed vectors; DARE's drop is unbiased, so dare_ties' expected
        # vote is that of the whole vectors and each survivor is kept with probability density
        voters = trimmed if method == "ties" else list(flat)
        if vote == "weighted":
            total = sum(w * v for w, v in zip(weights, voters, strict=True))
        else:
            total = sum(voters)
        gamma = torch.where(total >= 0, 1.0, -1.0)
        kept_sq = []
        for i in range(n):
            keep = (voters[i] != 0) & (voters[i].sign() == gamma)
            share = float((flat[i][keep].double() ** 2).sum())
            kept_sq.append(share * (densities[i] if method == "dare_ties" else 1.0))
    elif method == "dare_linear":
        kept_sq = [s * d for s, d in zip(sq, densities, strict=True)]
    else:
        kept_sq = list(sq)
    return TensorSums(numel=flat.shape[1], n=n, sq=sq, dot=dots,
                      conflicts=int((positive & negative).sum()), ties_and=ties_and,
                      ties_or=ties_or, tall_and=tall_and, tall_or=tall_or, kept_sq=kept_sq)
