"""Private helpers shared by the advanced method families (LiNeS, Consensus/TALL, PCB, DOGE).

Task vectors stacked as one (T, ...) tensor, and the official TIES steps (trim with the
official threshold rule, "mass" sign election, dis-sum / dis-mean) built on the core
:mod:`modelalloy.methods._sparsify` pieces; whole-model thresholds come from its bounded-memory
``global_thresholds``. Follows datafree.md §3 (``prateeky2806/ties-merging``).

``scope="per_tensor"`` applies the same official rule within each tensor instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from modelalloy.errors import MethodError
from modelalloy.methods._sparsify import combine, elect_sign, global_thresholds, threshold_trim_
from modelalloy.methods.orderstats import kth_smallest
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
    return float(kth_smallest(values.abs(), k))


def trim(tvs: torch.Tensor, thresholds: list[float | None]) -> torch.Tensor:
    """Zero the entries of each task row whose |value| is below its threshold (ties kept)."""
    out = tvs.clone()
    for t, thr in enumerate(thresholds):
        threshold_trim_(out[t], thr)
    return out


@dataclass(frozen=True)
class TiesStats:
    """Whole-model TIES statistics: one trim threshold per expert and the majority sign."""

    thresholds: list[float | None]
    majority: float | None


def ties_prepare(groups: GroupsFactory, density: float,
                 select: Callable[[TensorGroup], bool] | None = None) -> TiesStats:
    """Official whole-model TIES thresholds and majority sign, in bounded memory.

    Delegates to :func:`modelalloy.methods._sparsify.global_thresholds` (two histogram/select
    passes, no concatenation of the model).
    """
    first = next(iter_groups(groups, select), None)
    if first is None:
        return TiesStats(thresholds=[], majority=1.0)
    stats = global_thresholds(lambda: iter_groups(groups, select),
                              [density] * len(first.experts), majority=True)
    return TiesStats(thresholds=list(stats["thresholds"]), majority=stats["majority"])


def ties_delta(tvs: torch.Tensor, density: float, how: str,
               stats: TiesStats | None) -> torch.Tensor:
    """The unscaled TIES merged task vector of one tensor (official rule).

    With ``stats`` (global scope) the whole-model thresholds and majority sign are used;
    without, each expert's threshold is the official rule applied within this tensor
    (m = d − int(density·d), keep |τ| ≥ m-th smallest, ties kept) and zero sums take this
    tensor's majority sign. ``how``: "sum" (dis-sum) or "mean" (dis-mean).
    """
    if stats is not None:
        thresholds = stats.thresholds
        majority = stats.majority
    else:
        thresholds = [kth_largest_abs(tvs[t], density) for t in range(tvs.shape[0])]
        majority = None
    deltas = list(trim(tvs, thresholds).unbind(0))
    ones = [1.0] * len(deltas)
    sign = elect_sign(deltas, ones, "paper", majority)
    return combine(deltas, ones, sign=sign, normalize=(how == "mean"))


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
