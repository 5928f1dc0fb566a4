"""Passthrough: copy one model's tensors, optionally scaled.

``passthrough`` — mergekit (Goddard et al., "Arcee's MergeKit", EMNLP 2024 Industry,
arXiv 2403.13257), where it is the building block of frankenmerges (``slices:``).

    θ = s · θ_1        (s = the model's ``scale``, default 1: an exact copy)

Exactly one model. ``scale`` is per model, so a gradient or a filter (``{filter: o_proj,
value: 0}``) scales chosen tensors, e.g. to zero a repeated layer's output projections.
Same under both conventions.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods.registry import Execution, MergeContext, Param, register_method


@register_method(
    name="passthrough",
    params=[Param("scale", float, 1.0, "factor applied to the model's tensor", per_model=True)],
    paper="mergekit (Goddard et al., arXiv 2403.13257)",
    summary="Copy the one model's tensors, times an optional scale",
    base="none",
    min_models=1,
    max_models=1,
    execution=Execution(shape="elementwise"),
)
def passthrough(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
                ctx: MergeContext) -> torch.Tensor:
    scale = float(params["scale"][0])
    return experts[0].clone() if scale == 1.0 else torch.mul(experts[0], scale)
