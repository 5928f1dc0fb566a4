"""Multi-SLERP: barycentric interpolation of several models on the hypersphere.

``multislerp`` — Goddard, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea,
2025), as implemented in mergekit (arXiv 2403.13257).

Per tensor, with x_i = θ_i (or θ_i − θ_0 with a base) flattened and weights w_i (divided by
Σ w_i when ``normalize_weights``):

    n_i = ‖x_i‖,  u_i = x_i / (n_i + ε),  m = Σ_i w_i u_i,  m̂ = m / ‖m‖
    τ_i = u_i − ⟨u_i, m̂⟩ m̂                (projection onto the tangent space at m̂)
    T = Σ_i w_i τ_i,  ν = ‖T‖ + ε
    θ = (m̂ cos ν + T sin(ν)/ν) · Σ_i w_i n_i      (+ θ_0)

With two models and ‖m‖ < ε (antipodal, equal weights) it falls back to Σ w_i x_i; with more
it is an error. One model is returned as it is. Same under both conventions.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.errors import MethodError
from modelalloy.methods.registry import MergeContext, Param, register_method


@register_method(
    name="multislerp",
    params=[
        Param("weight", float, 1.0, "weight of this model on the sphere", per_model=True),
        Param("normalize_weights", bool, True, "divide the weights by their sum"),
        Param("eps", float, 1e-8, "small constant against division by zero", gt=0.0),
    ],
    paper="Goddard, Multi-SLERP (2025); mergekit (arXiv 2403.13257)",
    summary="Weighted spherical mean of several models or task vectors (tangent-space average)",
    base="optional",
    min_models=1,
)
def multislerp(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
               ctx: MergeContext) -> torch.Tensor:
    if len(experts) == 1:
        return experts[0].clone()
    eps = float(params["eps"])
    x = torch.stack([e.reshape(-1) for e in experts])
    if base is not None:
        x = x - base.reshape(1, -1)
    w = torch.tensor(params["weight"], dtype=x.dtype, device=x.device)
    if params["normalize_weights"]:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < eps:
        if len(experts) != 2:
            raise MethodError(f"tensor '{ctx.name}': multislerp's weighted mean direction is "
                              "zero (antipodal models with balancing weights); change the "
                              "weights")
        out = (x[0] * w[0] + x[1] * w[1])
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        t_sum = (tangents * w[:, None]).sum(0)
        t_norm = torch.linalg.vector_norm(t_sum) + eps
        out = (mean * torch.cos(t_norm) + t_sum * (torch.sin(t_norm) / t_norm)) \
            * (norms.squeeze(-1) * w).sum()
    out = out.view(experts[0].shape)
    return out if base is None else out.add_(base)
