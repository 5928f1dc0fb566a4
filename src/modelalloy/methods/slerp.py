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

Parameter: ``t``, required (as in mergekit; a recipe without it is refused).
Layer-wise gradients of t (lists) are resolved by the recipe/plan layer before the method runs.
Differences from mergekit: torch float32 for the interpolation, float64 for the norms and the dot
(mergekit round-trips through numpy float32), and the two-expert task-vector form, which
mergekit does not have.

Norms and dot are sums over the whole tensor: Σv0², Σv1², Σv0·v1 in float64, one chunk of
``SLICE_ELEMENTS`` after another in order (:mod:`modelalloy.methods.gram`). The engine
gathers them in a first pass over a large tensor's slices (its ``Execution.passes``), then
interpolates slice by slice, so SLERP streams like the elementwise methods — and gives the
same bits as the whole-tensor merge, which sums the same chunks in the same order.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from modelalloy.methods.gram import Gram, SlicedGram, add_gram_, new_gram
from modelalloy.methods.registry import Execution, MergeContext, Param, register_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def interpolate(t: float, v0: torch.Tensor, v1: torch.Tensor, gram: Gram, *,
                reuse_v0: bool = False) -> torch.Tensor:
    """SLERP (or the lerp fallback) of ``v0`` and ``v1`` given their whole-tensor Gram
    matrix (Σv0², Σv0·v1 / ·, Σv1²).

    A new tensor and the inputs untouched; with ``reuse_v0`` (``v0`` is the caller's own
    scratch) the result may be written into ``v0`` instead, saving a numel-sized allocation.
    """
    if t == 0.0:
        return v0 if reuse_v0 else v0.clone()
    if t == 1.0:
        return v1.clone()
    n0, n1 = math.sqrt(gram[0][0]), math.sqrt(gram[1][1])
    # ⟨v0/‖v0‖, v1/‖v1‖⟩ without normalized copies: divide the raw dot by the norms.
    dot = gram[0][1] / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return v0.lerp_(v1, t) if reuse_v0 else torch.lerp(v0, v1, t)
    dot = max(-1.0, min(1.0, dot))
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    s0 = math.sin((1.0 - t) * omega) / sin_omega
    s1 = math.sin(t * omega) / sin_omega
    out = v0.mul_(s0) if reuse_v0 else torch.mul(v0, s0)
    return out.add_(v1, alpha=s1)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *,
                  reuse_v0: bool = False) -> torch.Tensor:
    """Spherical interpolation between two whole tensors (see :func:`interpolate`)."""
    gram = new_gram(2)
    if 0.0 < t < 1.0:
        add_gram_(gram, (v0, v1))
    return interpolate(t, v0, v1, gram, reuse_v0=reuse_v0)


def _endpoints(base: torch.Tensor, experts: list[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(v0, v1, whether they are task vectors to add back to the base)."""
    if len(experts) == 1:
        return base, experts[0], False
    return torch.sub(experts[0], base), torch.sub(experts[1], base), True


def _reduce_slice(base: torch.Tensor | None, experts: list[torch.Tensor],
                  params: dict[str, Any], ctx: MergeContext) -> None:
    """First pass of a sliced merge: this slice's Gram terms into its :class:`SlicedGram`."""
    gram = ctx.state(SlicedGram, lambda: SlicedGram(new_gram(2))).gram
    if 0.0 < float(params["t"]) < 1.0:
        v0, v1, _ = _endpoints(cast(torch.Tensor, base), experts)
        add_gram_(gram, (v0, v1))


@register_method(
    name="slerp",
    paper_settings={"t": 0.5},  # mergekit requires t; the bench interpolates halfway
    params=[Param("t", float, None, "interpolation factor: 0 = base model, 1 = the other model",
                  ge=0.0, le=1.0, required=True)],
    paper="Shoemake, SIGGRAPH 1985; mergekit (Goddard et al., arXiv 2403.13257)",
    summary="Spherical interpolation from the base (t=0) to the other model (t=1)",
    base="required",
    min_models=1,
    max_models=2,
    execution=Execution(shape="elementwise", passes=(_reduce_slice,)),
)
def slerp(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
          ctx: MergeContext) -> torch.Tensor:
    t = float(params["t"])
    v0, v1, tau = _endpoints(cast(torch.Tensor, base), experts)
    if ctx.slice_start is None:
        out = slerp_tensors(t, v0, v1, reuse_v0=tau)
    else:
        out = interpolate(t, v0, v1, ctx.state(SlicedGram).gram, reuse_v0=tau)
    return out.add_(cast(torch.Tensor, base)) if tau else out
