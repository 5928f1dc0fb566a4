"""PCB-Merging — Parameter Competition Balancing (Du et al., NeurIPS 2024, arXiv 2410.02396).

Official code ``duguodong7/pcb-merging`` (top-level ``pcb-merging.py::PCB_merge``). Spec:
datafree.md §9. With M ∈ R^{T×d} the task vectors flattened over the whole model, every
rank/normalisation below is per task row over all d parameters:

1. Clip: A = clamp(|M|, lo_t, hi_t) with lo_t, hi_t the values at sorted indices ⌊d·r_c⌋ and
   ⌊d(1−r_c)⌋−1 of |M_t|; τ̂ = sign(M)·A (zeros stay zero).
2. Intra-balancing: β_intra = exp(T · Norm(A)²), Norm(x) = (x − min_row)/(max_row − min_row)
   (the paper's softmax denominator is a row constant and cancels in step 5).
3. Inter-balancing: β_inter = tanh(M ⊙ Σ_s M_s), on the raw M (top-level file's form; the paper
   writes Σ_s softmax(Norm(τ_t ⊙ τ_s)), the vision script sign·Norm — [DIVERGENCE], we follow
   the top-level code as the spec's default).
4. β = β_intra ⊙ β_inter.
5. Drop and rescale: clamp each row of β from below at its sorted value at index ⌊d(1−r)⌋ and
   min-max normalise → β̂ ∈ [0, 1]; the bottom (1 − r) fraction (and ties at the threshold)
   become exactly 0. r = ``keep_ratio``.
6. τ_m = Σ_t β̂_t ⊙ τ̂_t / max(Σ_t β̂_t, 1e-12);  θ = θ_0 + λ·τ_m.

Needs beyond one tensor (``scope="global"``, the official default): per task, the clip values
lo_t, hi_t over the whole model, then the β threshold and maximum over the whole model — four
``prepare`` passes (two exact order-statistic selections, histogram then in-bin ``kthvalue``,
see ``orderstats``), never concatenating the model. ``scope="per_tensor"``
computes the same statistics within each tensor (the spec's LLM approximation; not faithful).
Guards: Norm := 0 where max = min (an all-zero task gives β = 0, no NaN); β̂ := 0 where the
row's maximum equals its threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from modelalloy.methods._taskvec import (
    SCOPES,
    GroupsFactory,
    check_scope,
    need_base,
    stack_task_vectors,
)
from modelalloy.methods.orderstats import kth_smallest, order_stats
from modelalloy.methods.registry import Execution, MergeContext, Param, Prepare, register_method


@dataclass(frozen=True)
class PcbStats:
    """Per-task row statistics: clip bounds (lo, hi) and β threshold / maximum."""

    lo: torch.Tensor  # (T,)
    hi: torch.Tensor
    thr: torch.Tensor
    bmax: torch.Tensor


def _order_stat(flat: torch.Tensor, index: int) -> torch.Tensor:
    """The value at 0-based ``index`` of ascending-sorted ``flat``."""
    return kth_smallest(flat, index + 1)


def clip_bounds(abs_flat: torch.Tensor, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = abs_flat.numel()
    return (_order_stat(abs_flat, int(d * clip_ratio)),
            _order_stat(abs_flat, int(d * (1 - clip_ratio)) - 1))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def pcb_scores(tvs: torch.Tensor, lo: torch.Tensor,
               hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ̂, β) for one tensor given each task's clip bounds; tvs has shape (T, ...)."""
    lo_b, hi_b = _bcast(lo, tvs), _bcast(hi, tvs)
    a = torch.minimum(torch.maximum(tvs.abs(), lo_b), hi_b)
    clipped = torch.sign(tvs) * a
    span = hi_b - lo_b
    norm = torch.where(span > 0, (a - lo_b) / torch.where(span > 0, span, 1.0),
                       torch.zeros_like(a))
    intra = torch.exp(tvs.shape[0] * norm ** 2)
    inter = torch.tanh(tvs * tvs.sum(dim=0, keepdim=True))
    return clipped, intra * inter


def pcb_combine(clipped: torch.Tensor, beta: torch.Tensor, thr: torch.Tensor,
                bmax: torch.Tensor) -> torch.Tensor:
    """Steps 5-6: β̂ = minmax(clamp(β, thr, max)); Σ β̂ τ̂ / max(Σ β̂, 1e-12)."""
    thr_b, max_b = _bcast(thr, beta), _bcast(bmax, beta)
    span = max_b - thr_b
    scaled = torch.where(span > 0, (torch.clamp(beta, min=thr_b) - thr_b)
                         / torch.where(span > 0, span, 1.0), torch.zeros_like(beta))
    return (clipped * scaled).sum(dim=0) / scaled.sum(dim=0).clamp(min=1e-12)


def _tensor_stats(tvs: torch.Tensor, params: dict[str, Any]) -> PcbStats:
    n = tvs.shape[0]
    flat = tvs.reshape(n, -1)
    bounds = [clip_bounds(flat[t].abs(), params["clip_ratio"]) for t in range(n)]
    lo = torch.stack([b[0] for b in bounds])
    hi = torch.stack([b[1] for b in bounds])
    _, beta = pcb_scores(tvs, lo, hi)
    beta = beta.reshape(n, -1)
    d = beta.shape[1]
    thr = torch.stack([_order_stat(beta[t], int(d * (1 - params["keep_ratio"])))
                       for t in range(n)])
    return PcbStats(lo=lo, hi=hi, thr=thr, bmax=beta.max(dim=1).values)


def _prepare(groups: GroupsFactory) -> PcbStats | None:
    first = next(iter(groups()), None)
    if first is None:
        return None
    params = first.params
    check_scope(params["scope"])
    if params["scope"] != "global":
        return None
    n = len(first.experts)
    clip, keep = params["clip_ratio"], params["keep_ratio"]

    def abs_chunks() -> Iterator[list[torch.Tensor]]:
        for g in groups():
            tvs = stack_task_vectors(need_base(g.base, "pcb", g.name), g.experts)
            yield [tvs[t].abs().flatten() for t in range(n)]

    # Pass 1-2: each task's clip bounds lo_t, hi_t over the whole model.
    bounds, _ = order_stats(abs_chunks, n,
                            lambda r, d: [int(d * clip), int(d * (1 - clip)) - 1])
    lo = torch.tensor([b[0] for b in bounds])
    hi = torch.tensor([b[1] for b in bounds])

    def beta_chunks() -> Iterator[list[torch.Tensor]]:
        for g in groups():
            _, beta = pcb_scores(stack_task_vectors(cast(torch.Tensor, g.base), g.experts), lo, hi)
            yield [beta[t].flatten() for t in range(n)]

    # Pass 3-4: each task's β threshold at ⌊d(1 − r)⌋ and its maximum.
    thr, bmax = order_stats(beta_chunks, n, lambda r, d: [int(d * (1 - keep))])
    return PcbStats(lo=lo, hi=hi, thr=torch.tensor([t[0] for t in thr]),
                    bmax=torch.tensor(bmax))


@register_method(
    name="pcb",
    params=[
        Param("keep_ratio", float, 0.1, "r: fraction of each task's parameters kept by the "
              "balancing score (0.1-0.2 for T5, 0.05 for ViT in the official scripts)",
              gt=0.0, le=1.0),
        Param("clip_ratio", float, 1e-4, "r_c: magnitudes are clipped to the [r_c, 1 − r_c] "
              "quantiles per task (1e-4 top-level file; 0.01 NLP/vision scripts)",
              ge=0.0, lt=0.5),
        Param("lambda", float, 1.0, "λ: θ = θ_0 + λ·τ_m (tuned on validation in the paper)"),
        Param("scope", str, "global", "statistics over the whole model (official) or per "
              "tensor (approximation for large models)", choices=SCOPES),
    ],
    paper="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024 "
          "(arXiv 2410.02396)",
    summary="Weight each task's parameters by intra-task magnitude and inter-task agreement "
            "scores, drop the low-score ones, and take the score-weighted mean",
    base="required",
    execution=Execution(prepare=Prepare(_prepare)),
    uniform=True,
    aliases=("pcb_merging",),
)
def pcb(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
        ctx: MergeContext) -> torch.Tensor:
    """θ = θ_0 + λ · Σ_t β̂_t τ̂_t / Σ_t β̂_t (see the module docstring for β̂, τ̂).

    Needs beyond one tensor (global scope): per-task whole-model clip quantiles and β
    threshold/maximum from ``prepare``. Defaults: r = 0.1, r_c = 1e-4, λ = 1.
    """
    base = need_base(base, "pcb", ctx.name)
    tvs = stack_task_vectors(base, experts)
    stats: PcbStats | None = ctx.global_stats
    if stats is None:
        stats = _tensor_stats(tvs, params)
    clipped, beta = pcb_scores(tvs, stats.lo, stats.hi)
    return base + params["lambda"] * pcb_combine(clipped, beta, stats.thr, stats.bmax)
