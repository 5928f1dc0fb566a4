"""NearSwap: take the other model's value where it is close to the base's.

``nearswap`` — alchemonaut, "QuartetAnemoi-70B-t0.0001" (model card, 2024); as implemented in
mergekit (Goddard et al., arXiv 2403.13257).

With θ_0 the base and θ_1 the other model, per element:

    w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1),      θ = w·θ_1 + (1 − w)·θ_0

Elements that differ by at most ``t`` take θ_1 exactly; farther ones move toward θ_1 by the
fraction t/|θ_0 − θ_1|. ``t`` is required (as in mergekit). Same under both conventions.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods.registry import Execution, MergeContext, Param, register_method


@register_method(
    name="nearswap",
    params=[Param("t", float, None, "distance below which the other model's value is taken",
                  required=True)],
    paper="alchemonaut, QuartetAnemoi-70B-t0.0001 (2024); mergekit (arXiv 2403.13257)",
    summary="Per element, the other model's value where it is within t of the base's",
    base="required",
    min_models=1,
    max_models=1,
    execution=Execution(shape="elementwise"),
)
def nearswap(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
             ctx: MergeContext) -> torch.Tensor:
    assert base is not None  # base="required"
    other = experts[0]
    distance = torch.sub(base, other).abs_().clamp_(min=1e-6)
    weight = (float(params["t"]) / distance).clamp_(0.0, 1.0)
    # w·θ_1 + (1 − w)·θ_0, in that order
    return torch.mul(weight, other).add_(torch.rsub(weight, 1.0).mul_(base))
