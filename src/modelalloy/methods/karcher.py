"""Karcher mean: the Riemannian mean of the models' directions on the unit sphere.

``karcher`` — Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl.
Math. 1977; as a merge method in mergekit (arXiv 2403.13257).

Per tensor, with x_i the N models' tensors (the base, when given, is one of them, as in
mergekit), n_i = ‖x_i‖, u_i = x_i / n_i, and α_i = 1/N renormalised over the models with
n_i > tol:

    u ← normalize(Σ α_i u_i)                              (start; u_1 if that is ~0)
    repeat max_iter times:
        T = Σ_{i: Ω_i ≥ tol} α_i · Ω_i / sin Ω_i · (u_i − cos Ω_i · u),  cos Ω_i = clamp(⟨u, u_i⟩)
        stop if ‖T‖ < tol;  u ← normalize(cos‖T‖ · u + sin‖T‖ · T/‖T‖)
    θ = (Σ_i n_i / N) · u

(the fixed-point iteration of the exponential/log maps on the sphere). Zero tensors give zero.
Same under both conventions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from modelalloy.methods.registry import MergeContext, Param, register_method


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean direction of ``tensors`` times their mean norm (see module doc)."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [float(torch.linalg.vector_norm(t)) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = {i: tensors[i] / norms[i] for i in valid}
    total = sum(alphas[i] for i in valid)
    weights = {i: alphas[i] / total for i in valid}
    u = torch.zeros_like(units[valid[0]])
    for i in valid:
        u += weights[i] * units[i]
    norm_u = float(torch.linalg.vector_norm(u))
    u = units[valid[0]].clone() if norm_u < tol else u / norm_u
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for i in valid:
            cos = max(-1.0, min(1.0, float(torch.dot(u.reshape(-1), units[i].reshape(-1)))))
            omega = math.acos(cos)
            if omega < tol:
                continue
            tangent += weights[i] * (omega / math.sin(omega)) * (units[i] - cos * u)
        norm_t = float(torch.linalg.vector_norm(tangent))
        if norm_t < tol:
            break
        u = math.cos(norm_t) * u + math.sin(norm_t) * (tangent / norm_t)
        norm_u = float(torch.linalg.vector_norm(u))
        if norm_u > tol:
            u = u / norm_u
    return u * sum(a * n for a, n in zip(alphas, norms, strict=True))


@register_method(
    name="karcher",
    params=[
        Param("max_iter", int, 10, "iterations of the fixed-point update", ge=1),
        Param("tol", float, 1e-5, "convergence and zero-norm tolerance", gt=0.0),
    ],
    paper="Karcher, Comm. Pure Appl. Math. 1977; mergekit (arXiv 2403.13257)",
    summary="Riemannian (Karcher) mean of the models' directions, times their mean norm",
    base="optional",
    min_models=1,
)
def karcher(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
            ctx: MergeContext) -> torch.Tensor:
    points = ([base] if base is not None else []) + list(experts)
    if len(points) == 1:
        return points[0].clone()
    return karcher_mean(points, int(params["max_iter"]), float(params["tol"]))
