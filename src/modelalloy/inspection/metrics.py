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

import numpy as np
import torch

from modelalloy.methods.orderstats import MAG_BINS, SlicedTopK, magnitude_keys


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
    (called up to three times; a chunk is only read before the next one is asked for).

    The TIES trim masks are the merge's own (exactly k = ⌊density·numel⌋ kept per expert,
    ties at the threshold in index order): :class:`SlicedTopK`'s histogram pass and
    threshold-bin pass come first (the second skipped when nothing is trimmed), then one pass
    computes everything, so nothing larger than a chunk is held and the inner products
    accumulate in float64 across chunks. With numba (``modelalloy[fast]``) each pass is one
    fused loop (``kernels.interference``); without it, torch ops.
    """
    from modelalloy import kernels

    fused = kernels.available()
    topk = SlicedTopK(densities)
    trims = np.asarray([d < 1.0 for d in densities])
    live: list[torch.Tensor] = []  # the fused pass's histograms, counted into chunk by chunk
    for x in chunks():
        _count(topk, x, trims, live, fused)
    wanted = [topk.bin_of(i) for i in range(n)]
    if any(b >= 0 for b in wanted):
        for x in chunks():
            _collect(topk, x, wanted, fused)
    last = _FusedPass(n, topk, weights, mask_lambda, method, vote) if fused \
        else _TorchPass(n, topk, weights, mask_lambda, method, vote)
    for x in chunks():
        last.add(x)
    return last.sums(densities)


def _count(topk: SlicedTopK, x: torch.Tensor, trims: np.ndarray, live: list[torch.Tensor],
           fused: bool) -> None:
    """Pass 1 over one chunk: the |τ_i| histograms, all rows at once."""
    n, count = x.shape
    if fused:
        from modelalloy.kernels.interference import magnitude_counts

        if not live:  # SlicedTopK keeps these views and reads them after the pass
            live.append(torch.zeros(n, MAG_BINS, dtype=torch.int64))
            for i in range(n):
                topk.add_counts(i, live[0][i], count if i == 0 else 0)
        else:
            topk.add_counts(0, None, count)
        magnitude_counts(x.numpy(), count, trims, live[0].numpy())
        return
    keys = magnitude_keys(x.abs())
    keys += (torch.arange(n, dtype=torch.int32) * MAG_BINS).view(-1, 1)
    hist = torch.bincount(keys.view(-1), minlength=n * MAG_BINS).view(n, MAG_BINS)
    for i in range(n):
        topk.add_counts(i, hist[i], count)


def _collect(topk: SlicedTopK, x: torch.Tensor, wanted: list[int], fused: bool) -> None:
    """Pass 2 over one chunk: the |τ_i| in the bin holding row i's cut-off."""
    count = x.shape[1]
    if fused:
        from modelalloy.kernels.interference import bin_values

        out = np.empty(count, dtype=np.float32)
        for i, b in enumerate(wanted):
            if b >= 0:
                found = bin_values(x[i].numpy(), count, b, out)
                topk.add_values(i, torch.from_numpy(out[:found].copy()))
        return
    mag = x.abs()
    keys = magnitude_keys(mag)
    for i, b in enumerate(wanted):
        if b >= 0:
            topk.add_values(i, mag[i][keys[i] == b])


class _LastPass:
    """Pass 3's running sums (the inner products, conflicts, mask pairs, kept energy)."""

    def __init__(self, n: int, topk: SlicedTopK, weights: list[float], mask_lambda: float,
                 method: str, vote: str) -> None:
        self.n, self.topk, self.lam, self.method = n, topk, mask_lambda, method
        self.weighted = vote == "weighted"
        self.weights = weights
        self.numel = 0
        self.dots = torch.zeros(n, n, dtype=torch.float64)
        self.conflicts = 0
        self.kept = torch.zeros(n, dtype=torch.float64)
        self.ties_pairs, self.tall_pairs = _PairCounter(n), _PairCounter(n)

    def add(self, x: torch.Tensor) -> None:
        self.numel += x.shape[1]
        self.dots += (x @ x.T).double()

    def sums(self, densities: list[float]) -> TensorSums:
        n, dots, kept = self.n, self.dots, self.kept
        sq = [float(dots[i, i]) for i in range(n)]
        if self.method == "dare_ties":
            kept_sq = [float(k) * d for k, d in zip(kept, densities, strict=True)]
        elif self.method == "ties":
            kept_sq = [float(k) for k in kept]
        elif self.method == "dare_linear":
            kept_sq = [s_ * d for s_, d in zip(sq, densities, strict=True)]
        else:
            kept_sq = list(sq)
        ties_and, ties_or = self.ties_pairs.result()
        tall_and, tall_or = self.tall_pairs.result()
        return TensorSums(numel=self.numel, n=n, sq=sq, dot=dots.tolist(),
                          conflicts=self.conflicts, ties_and=ties_and, ties_or=ties_or,
                          tall_and=tall_and, tall_or=tall_or, kept_sq=kept_sq)


class _TorchPass(_LastPass):
    def add(self, x: torch.Tensor) -> None:
        super().add(x)
        n, topk = self.n, self.topk
        m = torch.stack([topk.trim_(i, x[i].clone()) != 0 for i in range(n)])
        low, high = torch.aminmax(x, dim=0)
        self.conflicts += int(((high > 0) & (low < 0)).sum())
        self.ties_pairs.add(m)
        mtl = x.sum(0)
        self.tall_pairs.add(x.abs() > self.lam * (mtl - x).abs())
        if self.method in ("ties", "dare_ties"):
            # TIES votes with the trimmed vectors; DARE's drop is unbiased, so dare_ties'
            # expected vote is that of the whole vectors, each survivor kept w.p. density
            voters = x * m if self.method == "ties" else x
            if self.weighted:
                coeff = torch.tensor(self.weights, dtype=torch.float32).view(-1, 1)
                total = (voters * coeff).sum(0)
            else:
                total = voters.sum(0)
            gamma = torch.where(total >= 0, 1.0, -1.0)
            keep = voters.sign() == gamma  # zero entries (trimmed or unchanged) never match
            self.kept += (x * x * keep).sum(1).double()


class _FusedPass(_LastPass):
    def __init__(self, n: int, topk: SlicedTopK, *args) -> None:
        super().__init__(n, topk, *args)
        from modelalloy.kernels.interference import VOTE_NONE, VOTE_TRIMMED, VOTE_WHOLE

        # trim_'s cases as (threshold, ties to keep): keep |τ| > v, then ties at v in order
        thresholds, ties = [], []
        for i in range(n):
            k, v, left = topk.plan(i)
            if k is not None and k <= 0:
                thresholds.append(float("inf"))
                ties.append(0)
            elif k is None or v is None or v == 0.0:  # every non-zero entry is kept
                thresholds.append(0.0)
                ties.append(0)
            else:
                thresholds.append(v)
                ties.append(left)
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.ties_left = np.asarray(ties, dtype=np.int64)
        self.vote = {"ties": VOTE_TRIMMED, "dare_ties": VOTE_WHOLE}.get(self.method, VOTE_NONE)
        self.coeff = np.asarray(self.weights, dtype=np.float32)
        self.coded = n <= MAX_CODED
        size = 1 << n if self.coded else 1
        self.ties_hist = np.zeros(size, dtype=np.int64)
        self.tall_hist = np.zeros(size, dtype=np.int64)
        self.ties_and = np.zeros((n, n), dtype=np.int64)
        self.tall_and = np.zeros((n, n), dtype=np.int64)
        self.kept_np = np.zeros(n, dtype=np.float64)
        self.clash = np.zeros(1, dtype=np.int64)

    def add(self, x: torch.Tensor) -> None:
        from modelalloy.kernels.interference import measure_pass

        super().add(x)
        measure_pass(x.numpy(), x.shape[1], self.thresholds, self.ties_left,
                     np.float32(self.lam), self.coeff, self.weighted, self.vote, self.coded,
                     self.ties_hist, self.tall_hist, self.ties_and, self.tall_and,
                     self.kept_np, self.clash)

    def sums(self, densities: list[float]) -> TensorSums:
        self.conflicts = int(self.clash[0])
        self.kept = torch.from_numpy(self.kept_np)
        for counter, hist, both in ((self.ties_pairs, self.ties_hist, self.ties_and),
                                    (self.tall_pairs, self.tall_hist, self.tall_and)):
            if self.coded:
                counter.hist = torch.from_numpy(hist)
            else:
                counter.both = both.tolist()
                counter.either = [[int(both[i, i] + both[j, j] - both[i, j])
                                   for j in range(self.n)] for i in range(self.n)]
        return super().sums(densities)
