"""Task arithmetic with learned per-chunk coefficients (the output of Expert Merging++).

Coefficient learners whose coefficients vary *inside* a tensor cannot be written as recipe
parameters, so they are saved as a statistic: ``<expert>/stats/merge_coeffs.safetensors``,
key = tensor name, value = a 1-D tensor of m chunk coefficients for that expert. The tensor's
flattened task vector is cut like ``torch.chunk(τ.flatten(), m)`` (contiguous slices of
⌈n/m⌉ entries; when that gives fewer than m slices the trailing coefficients are unused) and
each slice is scaled by its coefficient::

    θ = θ₀ + Σ_k Σ_s α_{k,s} τ_{k,s}

A tensor without coefficients for any expert stays at the base (Expert Merging keeps norms,
biases, embeddings and lm_head at the base).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from modelalloy.errors import MethodError
from modelalloy.methods.registry import MergeContext, Param, register_method


def chunk_scale(numel: int, coeffs: torch.Tensor) -> torch.Tensor:
    """Per-element scale (numel,) from m chunk coefficients with ``torch.chunk`` slicing."""
    m = int(coeffs.numel())
    if m == 1:
        return coeffs.reshape(1).expand(numel)
    size = -(-numel // m)  # ceil: torch.chunk's slice length
    n_chunks = -(-numel // size)
    sizes = [size] * (n_chunks - 1) + [numel - size * (n_chunks - 1)]
    return torch.repeat_interleave(coeffs.flatten()[:n_chunks],
                                   torch.tensor(sizes, device=coeffs.device))


@register_method(
    name="chunk_task_arithmetic", params=[],
    paper="Zhang et al., Expert Merging: Model Merging with Unsupervised Expert Alignment and "
          "Importance-Guided Layer Chunking, ICLR 2026",
    summary="task arithmetic with learned per-chunk coefficients read from merge_coeffs "
            "statistics",
    base="required", min_models=1, stats=("merge_coeffs",))
def chunk_task_arithmetic(base: torch.Tensor | None, experts: list[torch.Tensor],
                          params: dict[str, Any], ctx: MergeContext) -> torch.Tensor:
    """θ = θ₀ + Σ_k (chunk-wise α_k) ⊙ τ_k, α from ``ctx.stats["merge_coeffs"]``."""
    assert base is not None
    coeffs = ctx.stats.get("merge_coeffs") or [None] * len(experts)
    if all(c is None for c in coeffs):
        return base.clone()
    if any(c is None for c in coeffs):
        raise MethodError(f"tensor '{ctx.name}': some experts have merge coefficients and "
                          "others not")
    out = base.clone()
    for theta, c in zip(experts, coeffs, strict=True):
        scale = chunk_scale(theta.numel(), cast(torch.Tensor, c).to(theta.device)).reshape(
            theta.shape)
        out.add_((theta - base) * scale)
    return out


def parse_chunks(text: str, where: str) -> torch.Tensor | None:
    """The chunk coefficients written in a recipe: numbers separated by spaces ('' = none)."""
    if not text.strip():
        return None
    try:
        return torch.tensor([float(v) for v in text.split()], dtype=torch.float32)
    except ValueError:
        raise MethodError(f"{where}: parameter 'chunks' must be numbers separated by spaces, "
                          f"got {text[:40]!r}") from None


@register_method(
    name="task_arithmetic_chunks",
    params=[Param("chunks", str, "", "this tensor's chunk coefficients for the model, "
                  "space-separated float32 values ('' = none)", per_model=True)],
    paper="Zhang et al., Expert Merging: Model Merging with Unsupervised Expert Alignment and "
          "Importance-Guided Layer Chunking, ICLR 2026",
    summary="task arithmetic with per-chunk coefficients written in the recipe (per-tensor "
            "filter entries), the recipe form of chunk_task_arithmetic",
    base="required", min_models=1)
def task_arithmetic_chunks(base: torch.Tensor | None, experts: list[torch.Tensor],
                           params: dict[str, Any], ctx: MergeContext) -> torch.Tensor:
    """θ = θ₀ + Σ_k Σ_s α_{k,s} τ_{k,s} with α_k read from the model's ``chunks`` parameter
    (the same chunks and arithmetic as ``chunk_task_arithmetic``, so the same bits)."""
    assert base is not None
    coeffs = [parse_chunks(str(c), f"tensor '{ctx.name}'") for c in params["chunks"]]
    if all(c is None for c in coeffs):
        return base.clone()
    if any(c is None for c in coeffs):
        raise MethodError(f"tensor '{ctx.name}': some models have chunk coefficients and "
                          "others not")
    out = base.clone()
    for theta, c in zip(experts, coeffs, strict=True):
        assert c is not None
        scale = chunk_scale(theta.numel(), c.to(theta.device)).reshape(theta.shape)
        out.add_((theta - base) * scale)
    return out
