"""AIM — Activation-Informed Merging (Nobari et al., 2025; reference:
ahnobari/ActivationInformedMerging, ``MergeModels/ActivationMerging/_utils.py``:
``relax_on_merged``, ``apply_relaxation``).

A post-hoc relaxation of any merge: shrink the update Δ = θ_merged − θ_base on the input
channels that the **base** model activates strongly. For every weight of a non-embedding
module (Linear, norms, lm_head)::

    a[c]  = mean over calibration tokens of |x[..., c]|       (x: the module's input, base model)
    s     = |a| / max |a|              ∈ [0, 1]^{d_in}
    f     = 1 − s·(1 − ω)
    W     = W_base + Δ ⊙ f             (f broadcast along the weight's input dimension)

ω = 1: no change; ω = 0: channels with s = 1 revert to the base. Default ω = 0.4 (the paper's
value for 1.5B–14B models; recommended 0.2–0.6). Tensors without an activation statistic
(embeddings, biases) keep the merged value.

Contract: ``aim`` takes the base and exactly **one** expert, the merged model produced by any
other method (a previous recipe step), and reads ``ctx.stats["activations"][0]`` — which must be
the **base model's** activations (``modelalloy stats BASE --kind activations``), not the merged
model's. :func:`modelalloy.api.aim_relax` does the whole thing for in-memory state dicts.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.errors import MethodError
from modelalloy.methods.registry import MergeContext, Param, register_method


def aim_factor(activation: torch.Tensor, omega: float) -> torch.Tensor:
    """f = 1 − s(1 − ω) with s = |a| / max|a|."""
    a = activation.abs()
    top = a.max()
    s = a / top if top > 0 else torch.zeros_like(a)
    return 1.0 - s * (1.0 - omega)


@register_method(
    name="aim",
    params=[
        Param("omega", float, 0.4, "ω: 1 keeps the merge, 0 reverts the most active input "
              "channels to the base", ge=0.0, le=1.0),
        Param("input_dim", str, "auto", "weight dimension the activations run along: 'last' "
              "(nn.Linear), 'first' (GPT-2 Conv1D), 'auto' (from shapes; square = 'last')",
              choices=("auto", "last", "first")),
    ],
    paper="Nobari et al., Activation-Informed Merging of Large Language Models, 2025",
    summary="relax a merged model toward the base on the base's most active input channels",
    base="required", min_models=1, max_models=1, stats=("activations",), stats_from="base")
def aim(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
        ctx: MergeContext) -> torch.Tensor:
    """W = W_base + (W_merged − W_base) ⊙ (1 − s(1 − ω)); ``experts[0]`` is the merged model,
    ``ctx.stats["activations"][0]`` the base model's mean |input| per channel."""
    assert base is not None
    merged = experts[0]
    acts = ctx.stats.get("activations") or [None]
    a = acts[0]
    if a is None:
        return merged
    f = aim_factor(a.to(merged.device).flatten(), float(params["omega"]))
    delta = merged - base
    d = f.numel()
    if delta.dim() == 1:
        if delta.shape[0] != d:
            raise MethodError(f"tensor '{ctx.name}': {d} activation channels for a vector of "
                              f"{delta.shape[0]}")
        return base + delta * f
    last_ok, first_ok = delta.shape[-1] == d, delta.shape[0] == d
    choice = params["input_dim"]
    if choice == "first" and first_ok:
        return base + delta * f.reshape((d,) + (1,) * (delta.dim() - 1))
    if last_ok:
        return base + delta * f
    if first_ok:
        return base + delta * f.reshape((d,) + (1,) * (delta.dim() - 1))
    raise MethodError(f"tensor '{ctx.name}': {d} activation channels do not match a weight of "
                      f"shape {tuple(delta.shape)}")
