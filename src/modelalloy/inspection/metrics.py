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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from modelalloy.methods.orderstats import SlicedTopK


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


CHUNK = 1 << 18  # elements per pass: n inputs of 1 MB each stay in cache
MAX_CODED = 16  # up to this many experts, pair counts come from one histogram of mask codes


def _code_hist(masks: torch.Tensor) -> torch.Tensor:
    """Histogram of Σ_i mask_i·2^i over the elements (n ≤ MAX_CODED masks, n × C bool)."""
    n = masks.shape[0]
    weights = (1 << torch.arange(n, dtype=torch.int32)).view(-1, 1)
    codes = (masks.to(torch.int32) * weights).sum(0)
    return torch.bincount(codes, minlength=1 << n)


def _pairs_from_hist(hist: torch.Tensor, n: int) -> tuple[list[list[int]], list[list[int]]]:
    codes = torch.arange(hist.numel())
    bits = [((codes >> i) & 1).bool() for i in range(n)]
    both = [[int(hist[bits[i] & bits[j]].sum()) for j in range(n)] for i in range(n)]
    either = [[int(hist[bits[i] | bits[j]].sum()) for j in range(n)] for i in range(n)]
    return both, either


def _pairs_direct(masks: torch.Tensor, both: list[list[int]], either: list[list[int]]) -> None:
    n = masks.shape[0]
    for i in range(n):
        for j in range(n):
            both[i][j] += int((masks[i] & masks[j]).sum())
            either[i][j] += int((masks[i] | masks[j]).sum())


class _PairCounter:
    """|m_i ∧ m_j| and |m_i ∨ m_j| over chunks of n masks."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.hist = torch.zeros(1 << n, dtype=torch.int64) if n <= MAX_CODED else None
        self.both = [[0] * n for _ in range(n)]
        self.either = [[0] * n for _ in range(n)]

    def add(self, masks: torch.Tensor) -> None:
        if self.hist is not None:
            self.hist += _code_hist(masks)
        else:
            _pairs_direct(masks, self.both, self.either)

    def result(self) -> tuple[list[list[int]], list[list[int]]]:
        if self.hist is not None:
            return _pairs_from_hist(self.hist, self.n)
        return self.both, self.either


ChunkSource = Callable[[], Iterator[torch.Tensor]]


def chunks_of(taus: list[torch.Tensor]) -> ChunkSource:
    """A chunk source over task vectors held in memory."""
    flats = [t.reshape(-1).to(torch.float32) for t in taus]

    def chunks() -> Iterator[torch.Tensor]:
        for start in range(0, flats[0].numel(), CHUNK):
            yield torch.stack([f[start:start + CHUNK] for f in flats])
    return chunks


def tensor_sums(taus: list[torch.Tensor], **options) -> TensorSums:
    """The sums of one tensor whose task vectors are in memory (see :func:`streamed_sums`)."""
    return streamed_sums(chunks_of(taus), len(taus), **options)


def streamed_sums(chunks: ChunkSource, n: int, *, weights: list[float],
                  densities: list[float], mask_lambda: float, method: str,
                  vote: str = "paper") -> TensorSums:
    """The sums of one tensor, from ``chunks()``: its τ as (n × C) float32 chunks in order
    (called three times).

    The TIES trim masks are the merge's own (exactly k = ⌊density·numel⌋ kept per expert,
    ties at the threshold in index order): :class:`SlicedTopK`'s histogram pass and
    threshold-bin pass come first, then one pass computes everything, so nothing larger
    than a chunk is held and the inner products accumulate in float64 across chunks.
    """
    topk = SlicedTopK(densities)
    for x in chunks():
        for i in range(n):
            topk.count(i, x[i])
    for x in chunks():
        for i in range(n):
            topk.collect(i, x[i])
    numel = 0
    dots = torch.zeros(n, n, dtype=torch.float64)
    conflicts = 0
    ties_pairs, tall_pairs = _PairCounter(n), _PairCounter(n)
    kept = torch.zeros(n, dtype=torch.float64)
    coeff = torch.tensor(weights, dtype=torch.float32).view(-1, 1)
    for x in chunks():
        numel += x.shape[1]
        m = torch.stack([topk.trim_(i, x[i].clone()) != 0 for i in range(n)])
        dots += (x @ x.T).double()
        low, high = torch.aminmax(x, dim=0)
        conflicts += int(((high > 0) & (low < 0)).sum())
        ties_pairs.add(m)
        mtl = x.sum(0)
        tall_pairs.add(x.abs() > mask_lambda * (mtl - x).abs())
        if method in ("ties", "dare_ties"):
            # TIES votes with the trimmed vectors; DARE's drop is unbiased, so dare_ties'
            # expected vote is that of the whole vectors, each survivor kept w.p. density
            voters = x * m if method == "ties" else x
            total = (voters * coeff).sum(0) if vote == "weighted" else voters.sum(0)
            gamma = torch.where(total >= 0, 1.0, -1.0)
            keep = voters.sign() == gamma  # zero entries (trimmed or unchanged) never match
            kept += (x * x * keep).sum(1).double()
    sq = [float(dots[i, i]) for i in range(n)]
    if method == "dare_ties":
        kept_sq = [float(k) * d for k, d in zip(kept, densities, strict=True)]
    elif method == "ties":
        kept_sq = [float(k) for k in kept]
    elif method == "dare_linear":
        kept_sq = [s_ * d for s_, d in zip(sq, densities, strict=True)]
    else:
        kept_sq = list(sq)
    ties_and, ties_or = ties_pairs.result()
    tall_and, tall_or = tall_pairs.result()
    return TensorSums(numel=numel, n=n, sq=sq, dot=dots.tolist(), conflicts=conflicts,
                      ties_and=ties_and, ties_or=ties_or, tall_and=tall_and, tall_or=tall_or,
                      kept_sq=kept_sq)
