"""Shared pieces of the task-vector methods: trim, drop, elect, combine.

Every function here works on float32 tensors. Functions whose name ends in ``_`` modify their
first argument in place and return it; they are only ever called on tensors this package made
(task vectors), never on the caller's inputs.

Pieces:
- :func:`task_vectors`: τ_t = θ_t − θ_0 as fresh tensors.
- :func:`magnitude_trim_`: keep the largest |τ| (per tensor, exactly k; or with a given
  threshold, keeping ties). Uses ``kthvalue``, never a full sort.
- :func:`band_trim_`: Model Breadcrumbs' middle band (drop the top ``gamma``, keep the next
  ``density``), per row or per tensor.
- :func:`dare_`: DARE's Bernoulli drop with the 1/(1−p) or L1 rescale.
- :func:`magprune_`: DELLA's rank-based keep probabilities with the 1/π or L1 rescale.
- :func:`elect_sign` and :func:`combine`: TIES' sign election and (disjoint) weighted merge.
- :func:`global_thresholds`: the exact whole-model k-th largest |τ| per model in two passes with
  bounded memory (used by TIES ``scope: global``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from modelalloy.methods._l1 import abs_sum
from modelalloy.methods.orderstats import (
    MAG_SHIFT,
    SMALL,
    RankSelect,
    TiePositions,
    f32_from_bits,
    histogram,
    kth_largest,
    kth_smallest,
    locate,
    magnitude_keys,
)
from modelalloy.methods.registry import MergeContext, Param, TensorGroup

# --------------------------------------------------------------------------------------------
# Parameter schema pieces shared by the task-vector families (names follow mergekit).


def rescale_l1_param() -> Param:
    return Param("rescale", bool, False,
                 "after sparsifying, scale each task vector back to its original L1 norm "
                 "(mergekit's rescale)")


def weight_param() -> Param:
    # Negative weights (task negation) pass the schema; the recipe loader decides by the
    # recipe's conventions (mergekit accepts them; `conventions: paper` asks for
    # allow_negative_weights).
    return Param("weight", float, 1.0, "scale of this model's task vector", per_model=True)


def density_param(default: float = 1.0, help: str = "fraction of entries kept") -> Param:
    return Param("density", float, default, help, per_model=True, ge=0.0, le=1.0)


def lambda_param(*, allow_negative: bool = False) -> Param:
    return Param("lambda", float, 1.0, "scale of the merged task vector added to the base",
                 ge=None if allow_negative else 0.0)


def normalize_param(default: bool) -> Param:
    return Param("normalize", bool, default,
                 "divide by the sum of the (agreeing) weights")


INT8_MASK = Param("int8_mask", bool, False,
                  "accepted for mergekit recipes; has no effect (masks are always compact)")


def vote_param(paper_default: str = "paper") -> Param:
    """TIES' sign election: mergekit's weighted vote by default, ``paper_default`` under
    ``conventions: paper``."""
    return Param("vote", str, "weighted",
                 "sign election: 'paper' = sign of the sum of the trimmed task vectors, zero "
                 "sums take the majority sign; 'weighted' = mergekit, sign of the weighted sum, "
                 "zero sums take +", choices=("paper", "weighted"), paper_default=paper_default)


def has_negative_weight(params: dict[str, Any]) -> bool:
    """Whether a TIES-family merge has a negative weight: it then merges whole tensors on the
    torch path (:func:`combine_signed`), whose agreement test is mergekit's sign(w·δ) = γ."""
    return any(w < 0 for w in params.get("weight", ()))


# --------------------------------------------------------------------------------------------
# Task vectors


def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """τ_t = θ_t − θ_0, one fresh float32 tensor per expert (safe to modify in place)."""
    return [torch.sub(e, base) for e in experts]


def weighted_sum(base: torch.Tensor | None, experts: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> torch.Tensor:
    """Σ_t w_t (θ_t − θ_0) (or Σ_t w_t θ_t without a base) with two buffers whatever T is.

    Each difference is formed before scaling so small deltas keep their fp32 precision. The
    first term initialises the accumulator (no zero fill), unit weights skip the scaling.
    """
    acc = None
    scratch = None
    for e, w in zip(experts, weights, strict=True):
        if w == 0:
            continue
        if acc is None:
            acc = torch.sub(e, base) if base is not None else torch.mul(e, w) if w != 1 \
                else e.clone()
            if base is not None and w != 1:
                acc.mul_(w)
            continue
        if base is None:
            term = e
        else:
            if scratch is None:
                scratch = torch.empty_like(e)
            term = torch.sub(e, base, out=scratch)
        if w == 1:
            acc.add_(term)
        else:
            acc.add_(term, alpha=w)
    if acc is None:
        acc = torch.zeros_like(experts[0])
    return acc


# --------------------------------------------------------------------------------------------
# Magnitude trim (TIES)

class Scratch:
    """Reusable numel-sized work buffers for one tensor group (one merge call).

    The task-vector methods run the same per-model steps on T tensors of one shape; allocating
    their temporaries once per call instead of once per step saves both passes (fresh pages
    are faulted in on first touch) and peak memory.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.numel = like.numel()
        self.device = like.device
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None:
            buf = torch.empty(self.numel, dtype=dtype, device=self.device)
            self._bufs[key] = buf
        return buf

    def take(self, key: str) -> torch.Tensor | None:
        """Hand the buffer over to the caller (it is no longer scratch)."""
        return self._bufs.pop(key, None)


def _magnitude_trim_small_(delta: torch.Tensor, k: int) -> torch.Tensor:
    mag = delta.abs()
    v = kth_largest(mag, k)
    if float(v) == 0.0:  # fewer than k non-zero entries: every non-zero entry is kept
        return delta
    keep = mag >= v
    extra = int(keep.count_nonzero()) - k
    if extra > 0:  # ties at the threshold: drop the last `extra` of them in index order
        tied = (mag == v).view(-1)
        idx = tied.nonzero().squeeze(1)
        keep.view(-1)[idx[idx.numel() - extra:]] = False
    return delta.mul_(keep)


def magnitude_trim_(delta: torch.Tensor, density: float,
                    scratch: Scratch | None = None) -> torch.Tensor:
    """Keep exactly k = int(density·numel) largest-|·| entries of ``delta``; zero the rest.

    mergekit's count (``int(density * numel)``, no extras at the threshold). Entries tied at
    the threshold are kept in flat index order until k are kept, so the result does not depend
    on the device or on the sorting algorithm.

    Large contiguous tensors take a histogram route (see "Per-tensor math" in
    docs/methods/README.md): one pass for |δ|, one for the 16-bit bin keys and their
    histogram; the bin holding the threshold is usually a single value (bf16 checkpoints), in
    which case the tie-break is a prefix/suffix split at one flat index found from per-chunk
    counts, so the keep mask is built in place with ``ge_``/``gt_`` and no index lists. Two
    numel-sized buffers (``scratch``, reused across models) are all it needs.
    """
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    k = int(density * n)
    if k <= 0:
        return delta.zero_()
    if n < SMALL or not delta.is_contiguous() or delta.dtype != torch.float32:
        return _magnitude_trim_small_(delta, k)
    scratch = scratch if scratch is not None and scratch.numel == n else Scratch(delta)
    flat = delta.view(-1)
    mag = torch.abs(flat, out=scratch.get("mag"))
    work = scratch.get("work", torch.int32)  # bin keys, then a float 0/1 tie mask
    keys = magnitude_keys(mag, out=work)
    hist = histogram(keys)
    where = locate(torch.cumsum(hist, 0), n - k + 1)  # the cut-off is the m-th smallest |δ|
    b = where.index
    in_bin = int(hist[b])
    need = k - where.above  # entries of bin b to keep, 1 ≤ need ≤ in_bin
    if b == 0:  # the threshold may be 0 (fewer than k non-zero entries): rare, generic path
        return _magnitude_trim_small_(delta, k)
    lo = f32_from_bits(b << MAG_SHIFT)
    if need == in_bin:  # the whole bin is kept: exactly k entries have |δ| ≥ lo
        flat.mul_(mag.ge_(lo))
        return delta
    flags = work.view(torch.float32)
    # Usual case (bf16 checkpoints): most of the bin equals its lower edge lo, and the threshold
    # (the where.rank-th smallest in the bin) is one of those.
    torch.eq(mag, lo, out=flags)
    ties: TiePositions | None = TiePositions(flags)
    assert ties is not None
    if where.rank <= ties.total:
        v, n_tied = lo, ties.total
        r = need - (in_bin - n_tied)  # ties at v to keep, 1 ≤ r ≤ n_tied
    else:  # the threshold lies above lo inside the bin: select it exactly
        vals = mag[magnitude_keys(mag, out=work) == b]
        v = float(kth_smallest(vals, where.rank))
        n_tied = int((vals == v).sum())
        r = need - int((vals > v).sum())
        ties = None
        if r < n_tied:
            torch.eq(mag, v, out=flags)
            ties = TiePositions(flags)
    if r == n_tied:
        mag.ge_(v)
    else:  # ties at v: the first r in flat index order stay, i.e. |δ| ≥ v up to position pos
        assert ties is not None
        pos = ties.nth(r)
        mag[:pos + 1].ge_(v)
        mag[pos + 1:].gt_(v)
    flat.mul_(mag)  # mag is now the float 0/1 keep mask
    return delta


def threshold_trim_(delta: torch.Tensor, threshold: float | None,
                    scratch: Scratch | None = None) -> torch.Tensor:
    """Keep entries with |δ| ≥ threshold (ties kept, as in the official TIES code)."""
    if threshold is None:
        return delta
    buf = None
    if scratch is not None and scratch.numel == delta.numel():
        buf = scratch.get("mag").view(delta.shape)
    return delta.mul_(torch.abs(delta, out=buf).ge_(threshold))  # float 0/1 mask


# --------------------------------------------------------------------------------------------
# Breadcrumbs band


def band_trim_(delta: torch.Tensor, density: float, gamma: float,
               granularity: str = "row", scratch: Scratch | None = None) -> torch.Tensor:
    """Zero both magnitude tails: the top ``gamma`` and everything below the next ``density``.

    ``row`` (official Breadcrumbs): along the last dimension, n_top = int(n·gamma) and
    n_keep = int(n·density) per row; the kept band is ranks n_top+1 .. n_top+n_keep (1-indexed,
    by |δ| descending). 0-D tensors are left untouched; 1-D tensors are one row. Equal
    magnitudes rank by position (the lower index first), so the band does not depend on the
    device or the selection algorithm; the fused kernel (``kernels.rowwise``) follows the same
    rule.
    ``tensor`` (mergekit ``magnitude_outliers``): the same over the flattened tensor, except
    density ≥ 1 leaves the tensor untouched and n_top shrinks when density + gamma > 1; equal
    magnitudes rank as in mergekit's stable ascending sort (the higher index ranks higher).
    mergekit keeps nothing when n_top is 0 (its slice ``[n_bot:-0]`` is empty); this keeps
    the band, as the method intends.

    The rank-r value comes from ``topk`` on the int32 bit patterns of |δ| (same order as the
    floats, about 1.5x faster), the ties at it from their positions.
    """
    if delta.dim() == 0 or delta.numel() == 0:
        return delta
    if granularity == "tensor":
        n = delta.numel()
        if density >= 1.0:
            return delta
        n_keep = int(density * n)
        n_top = min(int(gamma * n), n - n_keep)
        # reversed, so "lower index first" is mergekit's "higher index ranks higher"
        rows = delta.reshape(-1).flip(0).view(1, n)
        _band_rows_(rows, n_top, n_keep, None)
        return delta.copy_(rows.view(-1).flip(0).view(delta.shape))
    n = delta.shape[-1]
    rows = delta.view(-1, n) if delta.is_contiguous() else delta.reshape(-1, n)
    _band_rows_(rows, int(gamma * n), int(density * n),
                scratch if scratch is not None and scratch.numel == delta.numel() else None)
    if rows.data_ptr() != delta.data_ptr():
        delta.copy_(rows.view(delta.shape))
    return delta


def _band_rows_(rows: torch.Tensor, n_top: int, n_keep: int, scratch: Scratch | None) -> None:
    """Keep, per row, the entries of |δ| ranks n_top+1 .. n_top+n_keep (ties by index)."""
    n = rows.shape[-1]
    hi = min(n, n_top + n_keep)
    if n_top == 0 and hi == n:
        return
    if hi <= n_top:
        rows.mul_(0.0)
        return
    if rows.dtype != torch.float32:  # the bit-pattern order below is float32's
        mag = rows.abs()
    else:
        if scratch is None:
            scratch = Scratch(rows)
        mag = torch.abs(rows, out=scratch.get("mag").view(rows.shape)).view(torch.int32)
    # The int32 bit patterns of non-negative floats order as the floats do (NaN above inf).
    ranked = torch.topk(mag, hi, dim=-1, sorted=True).values
    keep = _ranks_up_to(mag, ranked[:, hi - 1:hi], hi)
    if n_top:
        keep.logical_and_(_ranks_up_to(mag, ranked[:, n_top - 1:n_top], n_top).logical_not_())
    del ranked
    rows.mul_(keep)


def _ranks_up_to(mag: torch.Tensor, value: torch.Tensor, r: int) -> torch.Tensor:
    """Per row, whether each entry is among the r largest, ties at the r-th largest ``value``
    (a column) taken in index order: |δ| > value, or |δ| = value and fewer than
    r − #{|δ| > value} equal entries come before it in the row."""
    above = mag > value
    tied = mag == value
    room = r - above.sum(-1)  # ties at the value that still rank ≤ r, per row (≥ 1)
    row, col = tied.nonzero(as_tuple=True)  # row-major: by row, then by index
    per_row = tied.sum(-1)
    first = torch.cumsum(per_row, 0) - per_row
    order = torch.arange(row.numel(), device=mag.device) - first[row]
    take = order < room[row]
    above[row[take], col[take]] = True
    return above


# --------------------------------------------------------------------------------------------
# DARE / DELLA random drops


def scale_to_l1_(masked: torch.Tensor, l1_before: float, l1_after: float,
                 eps: float = 1e-7) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm: ×(‖δ‖₁ / ‖δ ⊙ m‖₁), unless
    either norm is below ``eps``. The norms are :func:`gram.abs_sum`'s float64 chunk sums,
    so a tensor merged in slices (the sums gathered in a first pass) gets the same factor."""
    factor = l1_factor(l1_before, l1_after, eps)
    return masked if factor is None else masked.mul_(factor)


def l1_factor(l1_before: float, l1_after: float, eps: float = 1e-7) -> float | None:
    """‖δ‖₁ / ‖δ ⊙ m‖₁, or None (no rescale) when either norm is below ``eps``."""
    return l1_before / l1_after if l1_before >= eps and l1_after >= eps else None


def l1_rescaled_(delta: torch.Tensor, sparsify: Callable[[torch.Tensor], Any],
                 rescale: bool) -> torch.Tensor:
    """Apply ``sparsify`` to ``delta`` in place; with ``rescale``, restore its L1 norm after.

    This is mergekit's ``rescale: true`` for the deterministic sparsifiers (TIES trim,
    Breadcrumbs band), where it defaults to false.
    """
    if not rescale:
        sparsify(delta)
        return delta
    l1 = abs_sum(delta)
    sparsify(delta)
    return scale_to_l1_(delta, l1, abs_sum(delta))


def dare_(delta: torch.Tensor, density: float, ctx: MergeContext, model_index: int,
          rescale: bool = True, rescale_norm: str = "density",
          l1_sums: tuple[float, float] | None = None) -> torch.Tensor:
    """DARE: drop each entry with p = 1 − density, then rescale the survivors.

    The mask is ``ctx.keep_mask(delta, density, model_index)``, so it depends only on (seed,
    tensor name, model index). Rescale ``density``: divide by density (= 1/(1−p), the paper);
    ``l1``: scale to the original L1 norm (current mergekit) — the whole tensor's
    (‖δ‖₁, ‖δ ⊙ m‖₁) are ``l1_sums`` when the caller gathered them over slices, else they are
    this tensor's. density = 1 is the identity; density = 0 gives zeros.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    l1 = rescale and rescale_norm == "l1"
    before = abs_sum(delta) if l1 and l1_sums is None else None
    # A multiply by the mask (vectorized) rather than masked_fill_ (an elementwise loop).
    delta.mul_(ctx.keep_mask(delta, density, model_index))
    if rescale and rescale_norm == "density":
        delta.mul_(1.0 / density)
    if l1:
        scale_to_l1_(delta, *(l1_sums if l1_sums is not None
                              else (cast(float, before), abs_sum(delta))))
    return delta


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities, per row along the last dimension.

    Ranks r = 0..n−1 of |δ| ascending in each row (stable for ties), q = r/(n−1), and
    π = (density − ε) + 2ε·q: the smallest entry gets density − ε, the largest density + ε.
    A row of one entry gets π = density (the official min-max normalisation is 0/0 there).
    """
    shape = delta.shape
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, shape[-1])
    n = rows.shape[-1]
    if n == 1:
        return torch.full(shape, density, dtype=delta.dtype, device=delta.device)
    # stable sort of the int32 bit patterns of |δ|: the same order as the floats, faster
    mag = rows.abs()
    order = torch.sort(mag.view(torch.int32) if mag.dtype == torch.float32 else mag, dim=-1,
                       stable=True).indices
    del mag
    ranks = torch.empty_like(rows)
    src = torch.arange(n, dtype=rows.dtype, device=rows.device).expand_as(rows)
    ranks.scatter_(-1, order, src)
    del order
    # π = (density − ε) + 2ε · r/(n−1)
    probs = ranks.mul_(2.0 * epsilon / (n - 1)).add_(density - epsilon)
    return probs.view(shape)


def magprune_(delta: torch.Tensor, density: float, epsilon: float, ctx: MergeContext,
              model_index: int, rescale: bool = True,
              rescale_norm: str = "probability") -> torch.Tensor:
    """DELLA MagPrune: keep each entry with its rank-based probability π, divide by π.

    Requires 0 < density − ε and density + ε < 1 when density < 1 (checked by the caller).
    ``rescale_norm`` ``probability`` (official DELLA): δ·m/π per element; ``l1``: match the
    original L1 norm (current mergekit).
    """
    if density >= 1.0:
        return delta
    probs = magprune_probabilities(delta, density, epsilon)
    l1 = abs_sum(delta) if rescale and rescale_norm == "l1" else None
    keep = ctx.rand_like(delta, model_index).lt_(probs)
    if rescale and rescale_norm == "probability":
        keep.div_(probs)
    del probs
    delta.mul_(keep)
    if l1 is not None:
        scale_to_l1_(delta, l1, abs_sum(delta))
    return delta


# --------------------------------------------------------------------------------------------
# Sign election and combination (TIES)


def elect_sign(deltas: Sequence[torch.Tensor], weights: Sequence[float], vote: str,
               majority: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The elected sign γ per coordinate, as a float tensor of −1, 0, +1.

    ``paper``: γ = sign(Σ_t τ̂_t) (the "mass" election of TIES); coordinates whose sum is 0 take
    the majority sign ``majority`` if given (whole-model scope), else sign(Σ_j γ_j) over this
    tensor. ``weighted`` (mergekit): γ = +1 where Σ_t w_t τ̂_t ≥ 0, else −1.

    ``out``: a float32 buffer shaped like the deltas to write γ into (else a new tensor).
    Zero sums are filled without a mask: for γ ∈ {−1, 0, +1}, sign(γ + m/2) maps 0 to the
    sign of m and leaves ±1 unchanged.
    """
    if out is None:
        total = torch.empty_like(deltas[0])
    else:
        total = out.view(deltas[0].shape)
    weighted = vote == "weighted"
    if weighted:
        torch.mul(deltas[0], weights[0], out=total)
        for d, w in zip(deltas[1:], weights[1:], strict=True):
            total.add_(d, alpha=w)
    elif len(deltas) == 1:
        total.copy_(deltas[0])
    else:
        torch.add(deltas[0], deltas[1], out=total)
        for d in deltas[2:]:
            total.add_(d)
    sign = total.sign_()  # sign(NaN) is 0 here
    if weighted:
        # where(total >= 0, 1, −1) for every non-NaN total (a NaN coordinate merges to NaN
        # whatever its γ)
        return sign.add_(0.5).sign_()
    if majority is None:
        majority = float(torch.sign(sign.sum()))
    if majority != 0.0:
        sign.add_(0.5 * majority).sign_()
    return sign


def _sum_(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_t w_t δ_t accumulated in ``deltas[0]`` (consumed)."""
    out = deltas[0]
    if weights[0] != 1.0:
        out.mul_(weights[0])
    for d, w in zip(deltas[1:], weights[1:], strict=True):
        if w == 1.0:
            out.add_(d)
        else:
            out.add_(d, alpha=w)
    return out


def combine_(deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
             sign: torch.Tensor | None, normalize: bool,
             scratch: Scratch | None = None) -> torch.Tensor:
    """:func:`combine` that consumes ``deltas`` (tensors this package made): the result is
    written into ``deltas[0]`` and the others are overwritten.

    With ``sign`` each δ_t becomes a_t = relu(δ_t·γ) in place — |δ_t| where δ_t agrees strictly
    with γ, else 0 — so Σ_t A_t w_t δ_t = γ · Σ_t w_t a_t and the agreement weight
    Σ_t A_t w_t = Σ_t w_t sign(a_t), without agreement masks. With weights ≥ 0, den is 0 or at
    least the smallest positive weight, and out is 0 where den is 0, so clamping den to that
    weight replaces the ``den ≤ 0 → 1`` fill exactly. ``scratch``'s "work" buffer, if any, is
    used for den.
    """
    if sign is None:
        out = _sum_(deltas, weights)
        if normalize:
            total = float(sum(weights))
            if abs(total) >= 1e-8:
                out.div_(total)
        return out
    if normalize and any(w < 0 for w in weights):  # not reachable from the methods (w ≥ 0)
        return combine(deltas, weights, sign=sign, normalize=normalize)
    agreeing = [d.mul_(sign).relu_() for d in deltas]  # a_t, in place
    den = None
    if normalize:
        buf = scratch.take("work") if scratch is not None else None
        den = torch.sign(agreeing[0], out=buf.view(torch.float32).view(sign.shape)
                         if buf is not None else None)
        if weights[0] != 1.0:
            den.mul_(weights[0])
    out = agreeing[0]
    if weights[0] != 1.0:
        out.mul_(weights[0])
    for a, w in zip(agreeing[1:], weights[1:], strict=True):
        if w == 1.0:
            out.add_(a)
        else:
            out.add_(a, alpha=w)
        if den is not None:
            den.add_(a.sign_(), alpha=w)
    if den is not None:
        positive = [w for w in weights if w > 0]
        den.clamp_min_(min(positive) if positive else 1.0)
        out.div_(den)
    return out.mul_(sign)


def combine_signed(deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                   normalize: bool) -> torch.Tensor:
    """mergekit's sign consensus on weighted task vectors, for any signs of the weights.

    With u_t = w_t δ_t: γ = +1 where Σ_t u_t ≥ 0, else −1; A_t = [sign(u_t) = γ];
    out = Σ_t A_t u_t, divided (``normalize``) by Σ_t A_t w_t, a zero divisor read as 1.
    For w_t ≥ 0 this is :func:`combine_` with the weighted vote; a negative weight flips which
    entries of δ_t agree.
    """
    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    total = torch.stack(weighted).sum(0)
    gamma = torch.where(total >= 0, 1.0, -1.0)
    out = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for u, w in zip(weighted, weights, strict=True):
        agree = (torch.sign(u) == gamma).to(u.dtype)
        out.add_(u * agree)
        den.add_(agree, alpha=w)
    if normalize:
        den[den == 0] = 1.0
        out.div_(den)
    return out


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
            sign: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """Mix task vectors into one delta.

    Without ``sign``: Σ_t w_t δ_t, divided by Σ_t w_t when ``normalize`` (a sum of weights below
    1e-8 in magnitude is treated as 1, as mergekit does).
    With ``sign`` (disjoint merge): only entries that agree strictly with the elected sign
    (A_t = δ_t·γ > 0, so zeros never count) are summed, Σ_t A_t w_t δ_t, divided by
    Σ_t A_t w_t where positive when ``normalize`` (the paper's disjoint mean for equal weights).
    The inputs are not modified (see :func:`combine_` for the in-place version).
    """
    if sign is None:
        out = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights, strict=True):
            out.add_(d, alpha=w)
        if normalize:
            total = float(sum(weights))
            if abs(total) >= 1e-8:
                out.div_(total)
        return out
    out = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0]) if normalize else None
    agree = torch.empty_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        torch.mul(d, sign, out=agree).gt_(0)  # float 0/1, strict: zeros never agree
        out.addcmul_(d, agree, value=w)
        if den is not None:
            den.add_(agree, alpha=w)
    if den is not None:
        den.masked_fill_(den <= 0, 1.0)
        out.div_(den)
    return out


# --------------------------------------------------------------------------------------------
# Whole-model thresholds in bounded memory


def global_thresholds(groups: Callable[[], Iterator[TensorGroup]], densities: Sequence[float],
                      *, check: Callable[[TensorGroup], None] | None = None,
                      majority: bool = False) -> dict[str, Any]:
    """Per model, the exact official TIES threshold over the whole model, in two passes.

    Official rule (``topk_values_mask``): over all d entries of model t's flattened task vector,
    v_t = the m-th smallest |τ| with m = d − int(density·d), and entries with |τ| ≥ v_t are
    kept. density ≥ 1 means no trim (threshold None).

    Pass 1 counts |τ| per bin of the upper 16 bits of the float32 pattern (monotone for
    non-negative floats) with ``torch.bincount``; the bin holding the m-th value follows from
    the cumulative counts. Pass 2 collects only the values in that bin and selects the exact
    value with ``kthvalue``. Memory: one 2**15 histogram per model plus one bin of values.

    With ``majority``, pass 2 also computes the whole-model majority sign sign(Σ_j γ_j) of the
    elected signs γ = sign(Σ_t τ̂_t) (paper vote), which resolves zero sums in the main pass.
    Coordinates whose keep decision depends on an in-bin value are kept aside (their values
    only) and finished once the thresholds are known.
    """
    n_models = len(densities)
    trims = [d < 1.0 for d in densities]
    select = RankSelect(n_models)
    # Pass 1: histograms
    for g in groups():
        if check is not None:
            check(g)
        select.add_numel(g.experts[0].numel())
        for t, e in enumerate(g.experts):
            if trims[t]:
                select.count(t, torch.sub(e, cast(torch.Tensor, g.base)).abs_())
    total = select.numel
    for t in range(n_models):
        if trims[t] and total:
            select.request(t, [max(1, total - int(densities[t] * total))])
    bins = [select.bins(t)[0] if select.bins(t) else -1 for t in range(n_models)]
    if not any(b >= 0 for b in bins) and not majority:
        return {"thresholds": [None] * n_models, "majority": None}

    # Pass 2: values inside each model's bin (+ majority sign fold)
    sign_sum = 0.0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (values T×u, sure T×u)
    for g in groups():
        s = torch.zeros_like(g.experts[0]) if majority else None
        undecided = None
        vals, sures = [], []
        for t, e in enumerate(g.experts):
            if bins[t] < 0 and not majority:
                continue
            d = torch.sub(e, cast(torch.Tensor, g.base))
            if bins[t] < 0:
                sure = torch.ones_like(d, dtype=torch.bool)
                und = None
            else:
                mag = d.abs()
                key = magnitude_keys(mag)
                sure = key > bins[t]
                und = key == bins[t]
                select.add_values(t, bins[t], mag[und])
                del key, mag
            if majority:
                cast(torch.Tensor, s).addcmul_(d, sure)
                vals.append(d)
                sures.append(sure)
                if und is not None:
                    undecided = und if undecided is None else undecided.logical_or_(und)
        if majority:
            if undecided is None:
                sign_sum += float(cast(torch.Tensor, s).sign().sum())
            else:
                sign_sum += float(cast(torch.Tensor, s)[~undecided].sign().sum())
                pending.append((torch.stack([v[undecided] for v in vals]),
                                torch.stack([x[undecided] for x in sures])))
    thresholds: list[float | None] = [select.cuts(t)[0].value if bins[t] >= 0 else None
                                      for t in range(n_models)]
    maj = None
    if majority:
        for values, sure in pending:
            acc = torch.zeros_like(values[0])
            for t in range(n_models):
                keep = sure[t] if thresholds[t] is None else (
                    sure[t] | (values[t].abs() >= cast(float, thresholds[t])))
                acc.addcmul_(values[t], keep)
            sign_sum += float(acc.sign().sum())
        maj = float(torch.sign(torch.tensor(sign_sum)))
    return {"thresholds": thresholds, "majority": maj}
