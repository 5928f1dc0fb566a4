"""Private helpers shared by the advanced method families (LiNeS, Consensus/TALL, PCB, DOGE).

Task vectors, the official TIES trim/elect/disjoint-merge steps, and whole-model thresholds
computed in a ``prepare`` pass. Kept here, private, until the core ``ties`` method lands on main;
these helpers follow datafree.md §3 (the official ``prateeky2806/ties-merging`` behaviour).

Global statistics (``scope="global"``) concatenate one expert's values over every tensor, as
the official code does (the order does not change an order statistic); that costs ``numel``
float32 per expert. For models too large for that, ``scope="per_tensor"`` computes the same
statistic tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from modelalloy.errors import MethodError
from modelalloy.methods.registry import TensorGroup

SCOPES = ("global", "per_tensor")
GroupsFactory = Callable[[], Iterator[TensorGroup]]


def need_base(base: torch.Tensor | None, method: str, name: str) -> torch.Tensor:
    if base is None:
        raise MethodError(f"method '{method}' needs a base model (tensor '{name}'): set "
                          "base_model in the recipe")
    return base


def stack_task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """τ_t = θ_t − θ_0, stacked on a new first dimension: shape (T, *base.shape)."""
    return torch.stack([e - base for e in experts])


def kth_largest_abs(values: torch.Tensor, density: float) -> float | None:
    """The TIES trim threshold of a flat vector: keep |x| >= returned value.

    Official ``topk_values_mask``: k = d − int(d·density); threshold = k-th smallest |x|
    (1-based). density >= 1 keeps everything (None).
    """
    d = values.numel()
    if density >= 1.0 or d == 0:
        return None
    k = d - int(d * density)
    return float(values.abs().flatten().kthvalue(max(k, 1)).values)


def trim(tvs: torch.Tensor, thresholds: list[float | None]) -> torch.Tensor:
    """Zero the entries of each task row whose |value| is below its threshold."""
    out = tvs.clone()
    for t, thr in enumerate(thresholds):
        if thr is not None:
            out[t] = torch.where(tvs[t].abs() >= thr, tvs[t], torch.zeros_like(tvs[t]))
    return out


def elect_sign(trimmed: torch.Tensor, majority: float | None = None) -> torch.Tensor:
    """TIES "mass" election: sign of the summed trimmed values; zeros get the majority sign.

    ``majority`` is the whole-model majority sign (global scope); None uses this tensor's.
    """
    sign = torch.sign(trimmed.sum(dim=0))
    if majority is None:
        majority = float(torch.sign(sign.sum()))
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Sum (``dis-sum``) or mean (``dis-mean``) of the entries agreeing strictly with ``sign``."""
    agree = ((sign > 0) & (trimmed > 0)) | ((sign < 0) & (trimmed < 0))
    picked = trimmed * agree
    total = picked.sum(dim=0)
    if how == "sum":
        return total
    return total / agree.sum(dim=0).clamp(min=1)


@dataclass(frozen=True)
class TiesStats:
    """Whole-model TIES statistics: one trim threshold per expert and the majority sign."""

    thresholds: list[float | None]
    majority: float


def ties_prepare(groups: GroupsFactory, density: float,
                 select: Callable[[TensorGroup], bool] | None = None) -> TiesStats:
    """Global thresholds (pass 1) and the global majority sign of the election (pass 2)."""
    flats: list[list[torch.Tensor]] | None = None
    for g in iter_groups(groups, select):
        base = need_base(g.base, "ties", g.name)
        tvs = stack_task_vectors(base, g.experts)
        if flats is None:
            flats = [[] for _ in g.experts]
        for t in range(len(g.experts)):
            flats[t].append(tvs[t].abs().flatten().cpu())
    if flats is None:
        return TiesStats(thresholds=[], majority=1.0)
    thresholds = [kth_largest_abs(torch.cat(f), density) for f in flats]
    del flats
    sign_sum = 0.0
    for g in iter_groups(groups, select):
        tvs = trim(stack_task_vectors(g.base, g.experts), thresholds)
        sign_sum += float(torch.sign(tvs.sum(dim=0)).sum())
    majority = 1.0 if sign_sum > 0 else (-1.0 if sign_sum < 0 else 0.0)
    return TiesStats(thresholds=thresholds, majority=majority)


def ties_delta(tvs: torch.Tensor, density: float, how: str,
               stats: TiesStats | None) -> torch.Tensor:
    """The unscaled TIES merged task vector of one tensor.

    With ``stats`` (global scope) the whole-model thresholds and majority sign are used;
    without, each expert is trimmed within this tensor and zeros get this tensor's majority.
    """
    if stats is not None:
        thresholds = stats.thresholds
        majority: float | None = stats.majority
    else:
        thresholds = [kth_largest_abs(tvs[t], density) for t in range(tvs.shape[0])]
        majority = None
    trimmed = trim(tvs, thresholds)
    return disjoint_merge(trimmed, elect_sign(trimmed, majority), how)


def iter_groups(groups: GroupsFactory,
                select: Callable[[TensorGroup], bool] | None = None) -> Iterator[TensorGroup]:
    """The groups one at a time, filtered. Order does not matter for the statistics here
    (order statistics and sums), so nothing is materialised beyond one group."""
    for g in groups():
        if select is None or select(g):
            yield g


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise MethodError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
