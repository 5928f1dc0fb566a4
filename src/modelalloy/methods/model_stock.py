"""Model Stock: interpolate between the average of the fine-tunes and the base by their angle.

``model_stock`` — Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024 (arXiv 2403.19522). The official repository (naver-ai/model-stock) has no code; this
follows the reference implementations (mergekit, FusionBench, MergeLLM).

Per tensor with N ≥ 2 fine-tunes, δ_i = θ_i − θ_0:

    cos θ = mean_{i<j} ⟨δ_i, δ_j⟩ / max(‖δ_i‖‖δ_j‖, 1e-6)   (each pair clamped to [−1, 1])
    t = N cos θ / (1 + (N − 1) cos θ),                      clamped to [0, 1]
    θ = t · mean_i θ_i + (1 − t) · θ_0

``filter_wise: true`` (mergekit) takes the angle and t per row along the last dimension (a 1-D
tensor is one row); the default is one angle per tensor. No weights. Zero deltas give cos = 0,
t = 0, the base.

Differences from mergekit: t is clamped to [0, 1], and t = 0 wherever 1 + (N−1)·cos θ ≤ 0
(mergekit's t turns negative for −1/(N−1) < cos θ < 0, divides by zero at cos θ = −1/(N−1) and
comes back positive, even above 1, beyond it). Like mergekit it needs the base plus at least
two models.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods.registry import MergeContext, Param, register_method


def model_stock_ratio(deltas: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """t per tensor (0-D) or per row (shape rows×1) from the mean pairwise cosine."""
    if filter_wise:
        rows = [d.reshape(1, -1) if d.dim() < 2 else d.reshape(-1, d.shape[-1]) for d in deltas]
    else:
        rows = [d.reshape(1, -1) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    n = len(rows)
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            dots = (rows[i] * rows[j]).sum(dim=-1)
            cos_sum += (dots / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            pairs += 1
    cos = cos_sum / pairs
    denom = 1 + (n - 1) * cos
    # t < 0 for −1/(N−1) < cos < 0 and t blows up as the denominator reaches 0; past it the
    # formula turns positive again. Every non-positive cos means "no shared direction": t = 0.
    t = torch.where(denom > 0, (n * cos) / denom.clamp(min=1e-12), torch.zeros_like(cos))
    return t.clamp_(0.0, 1.0).unsqueeze(-1)


@register_method(
    name="model_stock",
    params=[Param("filter_wise", bool, False,
                  "one ratio per row (last dimension) instead of one per tensor")],
    paper="Jang, Yun, Han, Model Stock, ECCV 2024 (arXiv 2403.19522)",
    summary="Average of the fine-tunes pulled toward the base by a ratio from their angle",
    base="required",
    min_models=2,
)
def model_stock(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
                ctx: MergeContext) -> torch.Tensor:
    deltas = [torch.sub(e, base) for e in experts]
    t = model_stock_ratio(deltas, params["filter_wise"])
    shape = base.shape
    # θ = θ_0 + t · mean_i δ_i  (= t·mean θ_i + (1−t)·θ_0)
    mean_delta = deltas[0]
    for d in deltas[1:]:
        mean_delta.add_(d)
    mean_delta.div_(len(deltas))
    flat = mean_delta.reshape(t.shape[0], -1)
    flat.mul_(t)
    return flat.reshape(shape).add_(base)
