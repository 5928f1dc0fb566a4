"""Model Stock: interpolate between the average of the fine-tunes and the base by their angle.

``model_stock`` — Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024 (arXiv 2403.19522). The official repository (naver-ai/model-stock) has no code; this
follows the reference implementations (mergekit, FusionBench, MergeLLM).

Per tensor with N ≥ 2 fine-tunes, δ_i = θ_i − θ_0:

    cos θ = mean_{i<j} ⟨δ_i, δ_j⟩ / max(‖δ_i‖‖δ_j‖, 1e-6)   (each pair clamped to [−1, 1])
    t = N cos θ / (1 + (N − 1) cos θ),                      clamped to [0, 1]
    θ = t · mean_i θ_i + (1 − t) · θ_0

``filter_wise: true`` (mergekit) takes the angle and t per row along the last dimension (a 1-D
tensor is one row, float32 sums); the default is one angle per tensor. No weights. Zero deltas
give cos = 0, t = 0, the base.

One angle per tensor streams: ‖δ_i‖² and ⟨δ_i, δ_j⟩ are float64 sums over chunks of the
tensor in order (:mod:`modelalloy.methods.gram`), gathered by the engine in a first pass over
a large tensor's slices, and θ is then formed slice by slice with the same bits as the
whole-tensor merge (which sums the same chunks in the same order).

Differences from mergekit: t is clamped to [0, 1], and t = 0 wherever 1 + (N−1)·cos θ ≤ 0
(mergekit's t turns negative for −1/(N−1) < cos θ < 0, divides by zero at cos θ = −1/(N−1) and
comes back positive, even above 1, beyond it). Like mergekit it needs the base plus at least
two models.
"""

from __future__ import annotations

import math
from typing import Any, cast, overload

import torch

from modelalloy.methods.gram import (
    Gram,
    SlicedGram,
    add_gram_,
    new_gram,
    thread_buffers,
)
from modelalloy.methods.registry import (
    Execution,
    FusedKernel,
    MergeContext,
    Param,
    Shape,
    register_method,
)


@overload
def _ratio(cos: float, n: int) -> float: ...
@overload
def _ratio(cos: torch.Tensor, n: int) -> torch.Tensor: ...
def _ratio(cos: torch.Tensor | float, n: int) -> torch.Tensor | float:
    """t = N cos / (1 + (N − 1) cos), 0 wherever the denominator is ≤ 0, clamped to [0, 1]."""
    if isinstance(cos, float):
        denom_f = 1 + (n - 1) * cos
        return min(max(n * cos / denom_f, 0.0), 1.0) if denom_f > 0 else 0.0
    denom = 1 + (n - 1) * cos
    # t < 0 for −1/(N−1) < cos < 0 and t blows up as the denominator reaches 0; past it the
    # formula turns positive again. Every non-positive cos means "no shared direction": t = 0.
    t = torch.where(denom > 0, (n * cos) / denom.clamp(min=1e-12), torch.zeros_like(cos))
    return t.clamp_(0.0, 1.0)


CLAMP_NOTE = ("model_stock: t = N·cos θ / (1 + (N − 1)·cos θ) fell outside [0, 1] and was "
              "clamped; mergekit would use it unclamped there (docs/recipes.md)")


@overload
def _unclamped(cos: float, n: int) -> float: ...
@overload
def _unclamped(cos: torch.Tensor, n: int) -> torch.Tensor: ...
def _unclamped(cos: torch.Tensor | float, n: int) -> torch.Tensor | float:
    """mergekit's t: the formula without the clamp (0 at its singularity)."""
    denom = 1 + (n - 1) * cos
    if isinstance(cos, float):
        return 0.0 if abs(cast(float, denom)) < 1e-6 else n * cos / denom
    return torch.where(cast(torch.Tensor, denom).abs() < 1e-6, torch.zeros_like(cos),
                       n * cos / denom)


def mean_cosine(gram: Gram) -> float:
    """mean over pairs of ⟨δ_i, δ_j⟩ / max(‖δ_i‖‖δ_j‖, 1e-6), each clamped to [−1, 1]."""
    n = len(gram)
    cosines = [max(-1.0, min(1.0, gram[i][j] / max(math.sqrt(gram[i][i] * gram[j][j]), 1e-6)))
               for i in range(n) for j in range(i + 1, n)]
    return sum(cosines) / len(cosines)


def ratio_from_gram(gram: Gram, ctx: MergeContext | None = None) -> float:
    """The per-tensor t from the deltas' Gram matrix (float64 sums, :func:`mean_cosine`);
    ``ctx`` is told (:data:`CLAMP_NOTE`) when mergekit's unclamped t would differ."""
    cos = mean_cosine(gram)
    t = _ratio(cos, len(gram))
    if ctx is not None and _unclamped(cos, len(gram)) != t:
        ctx.note(CLAMP_NOTE)
    return t


def filter_wise_ratio(deltas: list[torch.Tensor],
                      ctx: MergeContext | None = None) -> torch.Tensor:
    """t per row along the last dimension (shape rows × 1; a 1-D tensor is one row), float32."""
    rows = [d.reshape(1, -1) if d.dim() < 2 else d.reshape(-1, d.shape[-1]) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    n = len(rows)
    cos_sum = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            dots = (rows[i] * rows[j]).sum(dim=-1)
            cos_sum += (dots / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    cos = cos_sum / (n * (n - 1) // 2)
    t = _ratio(cos, n)
    if ctx is not None and not torch.equal(_unclamped(cos, n), t):
        ctx.note(CLAMP_NOTE)
    return t.unsqueeze(-1)


def _shape(params: dict[str, Any]) -> Shape:
    """One angle per tensor: a Gram pass over the slices, then an elementwise step; one per
    row (``filter_wise``) merges the tensor whole."""
    return "whole" if params["filter_wise"] else "elementwise"


def _reduce_slice(base: torch.Tensor | None, experts: list[torch.Tensor],
                  params: dict[str, Any], ctx: MergeContext) -> None:
    """First pass of a sliced merge: this slice's ‖δ_i‖² and ⟨δ_i, δ_j⟩ into its
    :class:`SlicedGram`."""
    gram = ctx.state(SlicedGram, lambda: SlicedGram(new_gram(len(experts)))).gram
    add_gram_(gram, experts, minus=base)


def _mean_delta(base: torch.Tensor, experts: list[torch.Tensor], acc: torch.Tensor,
                delta: torch.Tensor) -> torch.Tensor:
    """mean_i (θ_i − θ_0) into ``acc``, each δ_i formed in ``delta`` (two buffers for any N)."""
    torch.sub(experts[0], base, out=acc)
    for e in experts[1:]:
        acc.add_(torch.sub(e, base, out=delta))
    return acc.div_(len(experts))


@register_method(
    name="model_stock",
    params=[Param("filter_wise", bool, False,
                  "one ratio per row (last dimension) instead of one per tensor")],
    paper="Jang, Yun, Han, Model Stock, ECCV 2024 (arXiv 2403.19522)",
    summary="Average of the fine-tunes pulled toward the base by a ratio from their angle",
    base="required",
    min_models=2,
    execution=Execution(shape=_shape, passes=(_reduce_slice,),
                        kernel=FusedKernel("model_stock")),
)
def model_stock(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
                ctx: MergeContext) -> torch.Tensor:
    base = cast(torch.Tensor, base)  # base="required"
    if params["filter_wise"]:
        deltas = [torch.sub(e, base) for e in experts]
        t = filter_wise_ratio(deltas, ctx)
        mean_delta = _mean_delta(base, experts, deltas[0], deltas[1])
        return mean_delta.reshape(t.shape[0], -1).mul_(t).reshape(base.shape).add_(base)
    # θ = θ_0 + t · mean_i δ_i  (= t·mean θ_i + (1−t)·θ_0)
    if ctx.slice_start is None:
        ratio = ratio_from_gram(add_gram_(new_gram(len(experts)), experts, minus=base), ctx)
        acc, delta = torch.empty_like(base), torch.empty_like(base)
    else:
        ratio = ratio_from_gram(ctx.state(SlicedGram).gram, ctx)
        # this thread's slice buffers: the engine copies the result out before the next slice
        acc, delta = (b[:base.numel()].view(base.shape)
                      for b in thread_buffers("model_stock", 2, base.dtype, base.device,
                                               base.numel()))
    return _mean_delta(base, experts, acc, delta).mul_(ratio).add_(base)
