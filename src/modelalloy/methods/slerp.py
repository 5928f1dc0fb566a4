"""SLERP: spherical linear interpolation of two models, tensor by tensor.

``slerp`` — Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; as a merge
method popularised by mergekit (Goddard et al., "Arcee's MergeKit", EMNLP 2024 Industry,
arXiv 2403.13257); see also Lu, Luu & Buehler, npj Comput. Mater. 2024.

With v0 from ``base_model`` and v1 from the other model, t ∈ [0, 1], per tensor (float32):

    u_i = v_i/‖v_i‖ (if ‖v_i‖ > 1e-8),  dot = ⟨u0, u1⟩,  Ω = arccos(dot)
    slerp = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1      (on the unnormalized tensors)

If |dot| > 0.9995 (near-parallel or anti-parallel) it falls back to the lerp (1−t)v0 + t v1.
t = 0 returns v0 and t = 1 returns v1 exactly. A zero tensor is not normalized, so dot = 0 and
the result is cos(tπ/2)·v0 + sin(tπ/2)·v1, which is not a convex combination (as in mergekit).

Models: the base plus one expert is plain SLERP from the base to the expert (mergekit's
``slerp``). The base plus two experts interpolates the two task vectors τ_1 = θ_1 − θ_0 and
τ_2 = θ_2 − θ_0 and adds the result to the base: θ_0 + slerp(τ_1, τ_2, t).

Parameter: ``t`` (default 0.5, as mergekit's usual recipe value; mergekit requires it).
Layer-wise gradients of t (lists) are resolved by the recipe/plan layer before the method runs.
Differences from mergekit: pure torch float32 (mergekit round-trips through numpy), and the
two-expert task-vector form, which mergekit does not have.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from modelalloy.methods.registry import MergeContext, Param, register_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *,
                  reuse_v0: bool = False) -> torch.Tensor:
    """Spherical interpolation between two tensors.

    A new tensor and the inputs untouched; with ``reuse_v0`` (``v0`` is the caller's own
    scratch) the result may be written into ``v0`` instead, saving a numel-sized allocation.
    """
    if t == 0.0:
        return v0 if reuse_v0 else v0.clone()
    if t == 1.0:
        return v1.clone()
    n0 = float(torch.linalg.vector_norm(v0))
    n1 = float(torch.linalg.vector_norm(v1))
    # ⟨v0/‖v0‖, v1/‖v1‖⟩ without normalized copies: divide the raw dot by the norms.
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1)))
    dot /= (n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return v0.lerp_(v1, t) if reuse_v0 else torch.lerp(v0, v1, t)
    dot = max(-1.0, min(1.0, dot))
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    s0 = math.sin((1.0 - t) * omega) / sin_omega
    s1 = math.sin(t * omega) / sin_omega
    out = v0.mul_(s0) if reuse_v0 else torch.mul(v0, s0)
    return out.add_(v1, alpha=s1)


@register_method(
    name="slerp",
    params=[Param("t", float, 0.5, "interpolation factor: 0 = base model, 1 = the other model",
                  ge=0.0, le=1.0)],
    paper="Shoemake, SIGGRAPH 1985; mergekit (Goddard et al., arXiv 2403.13257)",
    summary="Spherical interpolation from the base (t=0) to the other model (t=1)",
    base="required",
    min_models=1,
    max_models=2,
)
def slerp(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
          ctx: MergeContext) -> torch.Tensor:
    t = float(params["t"])
    if len(experts) == 1:
        return slerp_tensors(t, base, experts[0])
    tau1 = torch.sub(experts[0], base)
    tau2 = torch.sub(experts[1], base)
    return slerp_tensors(t, tau1, tau2, reuse_v0=True).add_(base)
