"""Exact order statistics by histograms of float32 bit patterns: the one implementation.

Every magnitude cut-off in the package — TIES' top k (per tensor, over slices, over the whole
model), Breadcrumbs' band, PCB's quantiles, the interference metrics — is the value at some
rank of the ascending order of a set of float32 values, and the entries equal to it (the ties
at the cut-off) are split by their position. This module holds that math and nothing about
how a merge runs; the fused kernels (``modelalloy.kernels``) count with the same keys
(:data:`MAG_SHIFT`, :data:`MAG_BINS`) in their own loops, and the engine hands the streaming
classes their slices in order.

How a value at ascending rank m (1-based) of n values is found without a sort:

1. count the values per bin of a monotone 16-bit key of their bit pattern
   (:func:`magnitude_keys` for |x| ≥ 0: 2^15 bins; :func:`signed_keys` for any float: 2^16);
2. the bin holding rank m follows from the cumulative counts (:func:`locate`);
3. only the values of that bin are kept and the exact one is selected with ``kthvalue``.

Memory: one histogram per row plus the values of the selected bins. :class:`RankSelect` does
this over chunks that arrive one at a time (two passes); :class:`SlicedTopK` (TIES: exactly k
largest kept, ties at the cut-off in index order) and :class:`SlicedBand` (Breadcrumbs: a
band of descending ranks, ties in reversed index order, as mergekit's stable ascending sort)
build on it, and keep the running tie counts so that slices give the whole tensor's mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

MAG_SHIFT = 16  # the key of |x| is the upper 16 bits of its float32 pattern
MAG_BINS = 1 << 15  # sign bit 0: 2^15 keys
LOW_BINS = 1 << MAG_SHIFT  # the patterns inside one key
SIGNED_BINS = 1 << 16
SMALL = 4096  # below this many values a plain kthvalue is as fast as the histogram
_CHUNK = 1 << 16  # chunk length for counting tie positions (float32 sums stay exact)
Chunks = Callable[[], Iterator[list[torch.Tensor]]]


def magnitude_keys(mag: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Monotone int32 key in [0, 2^15] of a non-negative float32 (NaN above +inf)."""
    return torch.bitwise_right_shift(mag.view(torch.int32), MAG_SHIFT, out=out)


def signed_keys(x: torch.Tensor) -> torch.Tensor:
    """A key in [0, 2^16) that is non-decreasing in the float32 value (−0.0 below +0.0)."""
    i = x.contiguous().view(torch.int32)
    k = i ^ ((i >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    return (k >> 16) + (SIGNED_BINS // 2)


def histogram(keys: torch.Tensor, nbins: int = MAG_BINS) -> torch.Tensor:
    """int64 counts of each key in [0, nbins)."""
    return torch.bincount(keys.reshape(-1), minlength=nbins)


@dataclass(frozen=True)
class Bin:
    """Where ascending rank m lies: bin ``index``, rank ``rank`` (1-based) inside it, ``below``
    values in lower bins and ``above`` in higher ones."""

    index: int
    rank: int
    below: int
    above: int


def locate(cum: torch.Tensor, m: int) -> Bin:
    """The bin of the m-th smallest value (1 ≤ m ≤ n) from cumulative counts ``cum``."""
    b = int(torch.searchsorted(cum, torch.tensor(m, device=cum.device)))
    below = int(cum[b - 1]) if b > 0 else 0
    above = int(cum[-1]) - int(cum[b]) if b < cum.numel() else 0
    return Bin(b, m - below, below, above)


def f32_from_bits(bits: int) -> float:
    """The float32 whose bit pattern is ``bits`` (a bin's lower edge is ``key << 16``)."""
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def kth_smallest(values: torch.Tensor, m: int) -> torch.Tensor:
    """The exact m-th smallest (1-indexed, clamped to [1, n]) of a tensor, as ``kthvalue``."""
    flat = values.reshape(-1)
    return torch.kthvalue(flat, min(max(m, 1), flat.numel())).values


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest (1-indexed) of a non-negative tensor, without a sort.

    Large float32 tensors take the histogram route (about 1.5x faster than ``kthvalue`` over
    the whole tensor on the CPU): only the bin holding the value is selected in.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    m = n - k + 1  # rank from the bottom
    if n < SMALL or flat.dtype != torch.float32:  # the keys are float32 bit patterns
        return torch.kthvalue(flat, m).values
    keys = magnitude_keys(flat)
    where = locate(torch.cumsum(histogram(keys), 0), m)
    return torch.kthvalue(flat[keys == where.index], where.rank).values


class TiePositions:
    """Where the non-zeros of a 1-D float 0/1 tensor are, by per-chunk counts: the n-th tie
    of a cut-off in index order without listing every tie."""

    def __init__(self, flags: torch.Tensor) -> None:
        n = flags.numel()
        nfull = n // _CHUNK
        parts = []
        if nfull:
            parts.append(flags[:nfull * _CHUNK].view(nfull, _CHUNK).sum(1))
        if n > nfull * _CHUNK:
            parts.append(flags[nfull * _CHUNK:].sum().view(1))
        counts = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(torch.int64)
        self.flags = flags
        self.cum = torch.cumsum(counts, 0)
        self.total = int(self.cum[-1])

    def nth(self, r: int) -> int:
        """Flat index of the r-th non-zero (1-indexed, 1 ≤ r ≤ total)."""
        cum = self.cum
        j = int(torch.searchsorted(cum, torch.tensor(r, device=cum.device)))
        before = int(cum[j - 1]) if j > 0 else 0
        start = j * _CHUNK
        pos = self.flags[start:start + _CHUNK].nonzero()
        return start + int(pos[r - before - 1])


def tie_window(above: int, tied: int, top: int, hi: int) -> tuple[int, int]:
    """Which ties at a value hold descending ranks top+1 .. hi, when the higher index ranks
    higher (mergekit's stable ascending sort): the j-th tie in index order (0-based) has
    rank above + tied − j, so the kept j are [above + tied − hi, above + tied − top)."""
    return above + tied - hi, above + tied - top


@dataclass(frozen=True)
class Cut:
    """The value at a requested rank, how many values lie strictly above it and how many
    equal it (the ties at the cut-off)."""

    value: float
    above: int
    tied: int


class RankSelect:
    """Values at given ascending ranks of rows of values seen chunk by chunk, in two passes.

    Pass 1: :meth:`count` (or :meth:`add_counts` with a histogram counted elsewhere) per row
    and chunk, :meth:`add_numel` per chunk (rows all have the chunk's length). Then
    :meth:`request` the ranks of each row; pass 2: :meth:`collect` (or :meth:`add_values`) the
    values of the wanted bins; then :meth:`cuts`. The rows' keys are :func:`magnitude_keys`
    (non-negative float32 values). Pass 2 keeps no values: a wanted bin's values differ only
    in the low ``MAG_SHIFT`` bits of their pattern, so a histogram of those bits (``LOW_BINS``
    counts, 512 KB) orders and counts them exactly, however many fall in the bin (bf16
    models give task vectors of few distinct values, and a cut-off bin may hold a tenth of a
    tensor).
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.numel = 0
        self.hist: list[torch.Tensor | None] = [None] * rows
        self.wanted: list[list[Bin]] = [[] for _ in range(rows)]
        self.values: list[dict[int, torch.Tensor | None]] = [{} for _ in range(rows)]

    def add_numel(self, n: int) -> None:
        self.numel += n

    def count(self, r: int, mag: torch.Tensor) -> None:
        self.add_counts(r, histogram(magnitude_keys(mag.reshape(-1))))

    def add_counts(self, r: int, hist: torch.Tensor) -> None:
        """A chunk's bin counts of row r (the first may be a live view later chunks count
        into: it is kept, not copied)."""
        held = self.hist[r]
        self.hist[r] = hist if held is None else held.add_(hist)

    def request(self, r: int, ranks: Sequence[int]) -> None:
        """After pass 1: the ascending ranks (1 ≤ m ≤ numel) wanted of row r."""
        hist = self.hist[r]
        if hist is None or not ranks:
            return
        cum = torch.cumsum(hist, 0)
        self.wanted[r] = [locate(cum, m) for m in ranks]
        self.values[r] = dict.fromkeys((b.index for b in self.wanted[r]), None)
        self.hist[r] = None

    def bins(self, r: int) -> list[int]:
        """The keys whose values pass 2 collects for row r (sorted)."""
        return sorted(self.values[r])

    def collect(self, r: int, mag: torch.Tensor) -> None:
        if not self.values[r]:
            return
        flat = mag.reshape(-1)
        keys = magnitude_keys(flat)
        for b in self.bins(r):
            self.add_values(r, b, flat[keys == b])

    def add_values(self, r: int, b: int, values: torch.Tensor) -> None:
        """Values of row r in its wanted bin b (float32), counted by their low bits."""
        if not values.numel():
            return
        low = values.reshape(-1).contiguous().view(torch.int32) & (LOW_BINS - 1)
        self.add_low_counts(r, b, torch.bincount(low, minlength=LOW_BINS))

    def add_low_counts(self, r: int, b: int, counts: torch.Tensor) -> None:
        """Counts (``LOW_BINS``) of the low bits of row r's values in its wanted bin b,
        counted elsewhere (the first may be a live view later chunks count into)."""
        held = self.values[r][b]
        self.values[r][b] = counts if held is None else held.add_(counts)

    def cuts(self, r: int) -> list[Cut]:
        """After pass 2: one :class:`Cut` per requested rank of row r, in request order."""
        out = []
        for where in self.wanted[r]:
            low = self.values[r][where.index]
            assert low is not None  # pass 1 counted where.rank ≥ 1 values in the bin
            inside = locate(torch.cumsum(low, 0), where.rank)
            value = f32_from_bits((where.index << MAG_SHIFT) | inside.index)
            out.append(Cut(value, where.above + inside.above, int(low[inside.index])))
        return out


class _SlicedCounts:
    """Pass 1 of the per-model cut-offs of a tensor seen a slice at a time: one magnitude
    histogram per model that trims (density < 1), and the element count."""

    def __init__(self, densities: Sequence[float]) -> None:
        self.densities = list(densities)
        self.select = RankSelect(len(self.densities))

    @property
    def numel(self) -> int:
        return self.select.numel

    def _trims(self, t: int) -> bool:
        return self.densities[t] < 1.0

    def count(self, t: int, delta: torch.Tensor) -> None:
        if t == 0:
            self.select.add_numel(delta.numel())
        if self._trims(t):
            self.select.count(t, delta.abs())

    def add_counts(self, t: int, hist: torch.Tensor | None, numel: int) -> None:
        """Pass 1 from outside (the fused kernel): a slice's bin counts of model t (the first
        slice's counts may be a live view that later slices count into), and its element
        count with t = 0."""
        if t == 0:
            self.select.add_numel(numel)
        if hist is not None and self._trims(t):
            self.select.add_counts(t, hist)


class SlicedTopK(_SlicedCounts):
    """Per model, exactly k = int(density·n) largest |δ| of a tensor seen a slice at a time,
    ties at the cut-off kept in flat index order (the whole tensor's
    ``_sparsify.magnitude_trim_``).

    Three passes over the slices, in order: :meth:`count`, :meth:`collect` (the values in the
    bin that holds the cut-off), then :meth:`trim_` (keep |δ| > v, and ties at v while fewer
    than k − #{|δ| > v} have been kept — a running count, so slices must come in order). The
    fused kernel (``kernels.slices``) fills the same state with :meth:`add_counts`,
    :meth:`add_values` and reads :meth:`plan`. Memory: one 2^15 histogram, then one 2^16
    histogram of the cut-off bin's low bits, per model.
    """

    def __init__(self, densities: Sequence[float]) -> None:
        super().__init__(densities)
        self.k: list[int | None] = []
        self.thresholds: list[float | None] = []
        self.ties_left: list[int] = []

    def _locate(self) -> None:
        n = self.numel
        for t, density in enumerate(self.densities):
            k = int(density * n) if density < 1.0 else None
            self.k.append(k)
            if k is not None and k > 0:
                self.select.request(t, [n - k + 1])  # the cut-off is the m-th smallest |δ|
        self.ties_left = [0] * len(self.densities)

    def bin_of(self, t: int) -> int:
        """The bin key holding model t's threshold (−1: no trim), once pass 1 is done."""
        if not self.k:
            self._locate()
        bins = self.select.bins(t)
        return bins[0] if bins else -1

    def collect(self, t: int, delta: torch.Tensor) -> None:
        if self.bin_of(t) >= 0:
            self.select.collect(t, delta.abs())

    def add_values(self, t: int, values: torch.Tensor) -> None:
        """Pass 2 from outside: |δ| values of a slice that fall in :meth:`bin_of`."""
        self.select.add_values(t, self.bin_of(t), values)

    def _settle(self) -> None:
        for t in range(len(self.densities)):
            if self.bin_of(t) < 0:
                self.thresholds.append(None)
                continue
            cut = self.select.cuts(t)[0]
            self.thresholds.append(cut.value)
            k = self.k[t]
            assert k is not None
            self.ties_left[t] = k - cut.above

    def plan(self, t: int) -> tuple[int | None, float | None, int]:
        """(k, threshold, ties at the threshold still to keep) of model t, once pass 2 is
        done; the caller that trims must hand the remaining count back (``ties_left``)."""
        if not self.thresholds:
            self._settle()
        return self.k[t], self.thresholds[t], self.ties_left[t]

    def trim_(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        k, v, _ = self.plan(t)
        if k is None:
            return delta
        if k <= 0:
            return delta.zero_()
        if v is None or v == 0.0:  # fewer than k non-zero entries: every non-zero one is kept
            return delta
        mag = delta.abs()
        keep: torch.Tensor = mag > v
        if self.ties_left[t] > 0:
            tied = (mag == v).view(-1).nonzero().flatten()[:self.ties_left[t]]
            keep.view(-1)[tied] = True
            self.ties_left[t] -= tied.numel()
        return delta.mul_(keep)


def band_edges(n: int, density: float, gamma: float) -> tuple[int, int] | None:
    """mergekit's tensor-wide Breadcrumbs band of n values: descending ranks n_top+1 .. hi with
    n_keep = int(density·n), n_top = min(int(gamma·n), n − n_keep), hi = n_top + n_keep; None
    when nothing is cut (density ≥ 1, or a band of every rank)."""
    if density >= 1.0:
        return None
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    if n_top == 0 and n_top + n_keep >= n:
        return None
    return n_top, n_top + n_keep


BandCut = tuple[float, "float | None", dict[float, list[int]]]


class SlicedBand(_SlicedCounts):
    """Per model, the magnitude band of descending ranks n_top+1 .. hi (:func:`band_edges`)
    of a tensor seen a slice at a time; entries of equal magnitude rank as in mergekit's
    stable ascending sort (the higher index ranks higher). The whole-tensor result is
    ``_sparsify.band_trim_(…, "tensor")``'s.

    Passes as :class:`SlicedTopK`'s: :meth:`count`, :meth:`collect`, then :meth:`trim_` on the
    slices in order (keep v_lo < |δ| < v_top, and the ties at each cut-off value whose
    running index falls in its :func:`tie_window`). The fused kernel (``kernels.slices``)
    fills the same state with :meth:`add_counts` and :meth:`add_low_counts` (the bins of
    :meth:`bins_of`) and reads :meth:`plan`.
    """

    def __init__(self, densities: Sequence[float], gammas: Sequence[float]) -> None:
        super().__init__(densities)
        self.gammas = list(gammas)
        self.edges: list[tuple[int, int] | None] = []
        # per model: (v_lo, v_top or None, {cut value: [first kept tie, end, ties seen]})
        self.cut: list[BandCut | None] = []

    def bins_of(self, t: int) -> list[int]:
        """The bin keys (one or two, sorted) holding model t's cut-offs, once pass 1 is
        done; none when model t keeps all or nothing."""
        if not self.edges:
            self._locate()
        return self.select.bins(t)

    def add_low_counts(self, t: int, b: int, counts: torch.Tensor) -> None:
        """Pass 2 from outside: the low-bit counts of a slice's |δ| in bin b of
        :meth:`bins_of` (``RankSelect.add_low_counts``)."""
        self.select.add_low_counts(t, b, counts)

    def plan(self, t: int) -> tuple[tuple[int, int] | None, BandCut | None]:
        """(band edges, cut) of model t once pass 2 is done: edges None keeps δ whole, a cut
        None (an empty band) zeroes it, else the cut is (v_lo, v_top or None, the tie window
        [first, end, ties seen] of each cut value)."""
        if not self.cut:
            self._settle()
        return self.edges[t], self.cut[t]

    def _locate(self) -> None:
        n = self.select.numel
        for t, (density, gamma) in enumerate(zip(self.densities, self.gammas, strict=True)):
            edges = band_edges(n, density, gamma)
            self.edges.append(edges)
            if edges is None or edges[1] <= edges[0]:
                continue
            top, hi = edges
            self.select.request(t, [n - hi + 1] + ([n - top + 1] if top else []))

    def collect(self, t: int, delta: torch.Tensor) -> None:
        if not self.edges:
            self._locate()
        self.select.collect(t, delta.abs())

    def _settle(self) -> None:
        if not self.edges:
            self._locate()
        for t, edges in enumerate(self.edges):
            if edges is None or edges[1] <= edges[0]:
                self.cut.append(None)
                continue
            top, hi = edges
            cuts = self.select.cuts(t)
            windows = {c.value: [*tie_window(c.above, c.tied, top, hi), 0] for c in cuts}
            self.cut.append((cuts[0].value, cuts[1].value if top else None, windows))

    def trim_(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        edges, cut = self.plan(t)
        if edges is None:
            return delta
        if cut is None:  # an empty band
            return delta.mul_(0.0)
        low, top, windows = cut
        mag = delta.abs()
        keep = mag > low
        if top is not None:
            keep.logical_and_(mag < top)
        flat = keep.view(-1)
        for value, window in windows.items():
            first, end, seen = window
            tied = (mag == value).view(-1).nonzero().flatten()
            window[2] = seen + tied.numel()
            lo, hi = max(first - seen, 0), min(end - seen, tied.numel())
            if lo < hi:
                flat[tied[lo:hi]] = True
        return delta.mul_(keep)


def order_stats(passes: Chunks, n_rows: int, ranks: Callable[[int, int], list[int]],
                ) -> tuple[list[list[float]], list[float]]:
    """(values at the 0-based ascending ranks ``ranks(r, n_r)`` of every row r, the maximum of
    every row), over values of any sign that ``passes()`` yields chunk by chunk (a list with
    one flat float32 tensor per row; rows may differ in length). Two passes, keyed by
    :func:`signed_keys`. Ranks are clamped to [0, n_r − 1]; a row with no values gives 0.0.
    """
    hist: torch.Tensor | None = None
    maxima = [float("-inf")] * n_rows
    for chunk in passes():
        for r, v in enumerate(chunk):
            if v.numel() == 0:
                continue
            if hist is None:
                hist = torch.zeros(n_rows, SIGNED_BINS, dtype=torch.int64, device=v.device)
            hist[r] += histogram(signed_keys(v.flatten()), SIGNED_BINS)
            maxima[r] = max(maxima[r], float(v.max()))
    if hist is None:
        return [[0.0] * len(ranks(r, 0)) for r in range(n_rows)], [0.0] * n_rows
    targets: list[list[Bin]] = []
    for r in range(n_rows):
        cum = torch.cumsum(hist[r], 0)
        total = int(cum[-1])
        targets.append([locate(cum, min(max(rank, 0), max(total - 1, 0)) + 1)
                        for rank in ranks(r, total)])
    del hist
    wanted = [sorted({b.index for b in row}) for row in targets]
    found: list[dict[int, list[torch.Tensor]]] = [{b: [] for b in w} for w in wanted]
    for chunk in passes():
        for r, v in enumerate(chunk):
            if v.numel() == 0 or not wanted[r]:
                continue
            flat = v.flatten()
            keys = signed_keys(flat)
            for b in wanted[r]:
                sel = flat[keys == b]
                if sel.numel():
                    found[r][b].append(sel.cpu())
    out = []
    for r in range(n_rows):
        row = []
        for where in targets[r]:
            vals = torch.cat(found[r][where.index]) if found[r][where.index] else torch.zeros(1)
            row.append(float(vals.kthvalue(min(where.rank, vals.numel())).values))
        out.append(row)
    return out, [m if m != float("-inf") else 0.0 for m in maxima]
