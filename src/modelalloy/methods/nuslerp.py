"""NuSLERP: SLERP of two models (or task vectors) per row, per column or over the whole tensor.

``nuslerp`` — mergekit (Goddard et al., "Arcee's MergeKit", EMNLP 2024 Industry,
arXiv 2403.13257); SLERP after Shoemake, SIGGRAPH 1985.

Two models with weights w_1, w_2 (and optionally a base θ_0): t = w_2 / (w_1 + w_2) (0.5 when
|w_1 + w_2| < 1e-6), v_i = θ_i (or θ_i − θ_0 with a base). For each vector pair (v_1, v_2):

    u_i = v_i / max(‖v_i‖, 1e-7),  Ω = arccos(clamp(⟨u_1, u_2⟩, −1, 1))
    slerp = (sin((1 − t)Ω)·v_1 + sin(tΩ)·v_2) / sin Ω,    (1 − t)·v_1 + t·v_2 if |sin Ω| < 1e-8

and θ = slerp (+ θ_0 with a base). The vectors are the whole flattened tensor
(``nuslerp_flatten: true``, the default), else the rows along the last dimension, or with
``nuslerp_row_wise: true`` the vectors along the first dimension (mergekit's naming: "row
wise" slerps each column of a weight matrix). Negative weights extrapolate (t outside [0, 1]).
Unlike ``slerp`` the weights, not a ``t``, set the mix; it needs exactly two models besides an
optional base. Same under both conventions.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods.registry import MergeContext, Param, register_method


def nuslerp_vectors(t: float, v1: torch.Tensor, v2: torch.Tensor, *, dim: int = -1,
                    flatten: bool = True) -> torch.Tensor:
    """SLERP from ``v1`` (t = 0) to ``v2`` (t = 1) of each vector along ``dim`` (or of the
    whole tensors with ``flatten``); the result has the inputs' shape."""
    shape = v1.shape
    if flatten or v1.dim() <= 1:
        a, b = v1.reshape(1, -1), v2.reshape(1, -1)
    else:
        a, b = v1.transpose(dim, -1), v2.transpose(dim, -1)
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    omega = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    out = (torch.sin((1.0 - t) * omega) * a + torch.sin(t * omega) * b) / sin_omega
    colinear = (sin_omega.abs() < 1e-8).expand_as(out)
    out = torch.where(colinear, (1.0 - t) * a + t * b, out)
    if not (flatten or v1.dim() <= 1):
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def mix_from_weights(weights: list[float]) -> float:
    """t = w_2 / (w_1 + w_2), or 0.5 when the weights cancel."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@register_method(
    name="nuslerp",
    params=[
        Param("weight", float, 1.0, "relative weight of this model (t = w_2 / (w_1 + w_2))",
              per_model=True),
        Param("nuslerp_flatten", bool, True, "one angle for the whole tensor"),
        Param("nuslerp_row_wise", bool, False,
              "without flatten: slerp the vectors along the first dimension instead of the "
              "rows along the last"),
    ],
    paper="mergekit (Goddard et al., arXiv 2403.13257); Shoemake, SIGGRAPH 1985",
    summary="SLERP of two models or task vectors, mixed by their weights, per tensor or row",
    base="optional",
    min_models=2,
    max_models=2,
)
def nuslerp(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
            ctx: MergeContext) -> torch.Tensor:
    t = mix_from_weights(params["weight"])
    v1, v2 = experts if base is None else (experts[0] - base, experts[1] - base)
    out = nuslerp_vectors(t, v1, v2, dim=0 if params["nuslerp_row_wise"] else -1,
                          flatten=params["nuslerp_flatten"])
    return out if base is None else out.add_(base)
