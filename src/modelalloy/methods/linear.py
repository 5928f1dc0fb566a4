"""Weighted averaging (model soups).

``linear`` — Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022 (arXiv 2203.05482); the uniform
soup, and mergekit's ``linear`` method.

    θ = Σ_i w_i θ_i / Σ_i w_i      (normalize: true, the default)
    θ = Σ_i w_i θ_i                 (normalize: false)

All listed models are averaged; there is no base model (``base: none``). Defaults: ``weight`` 1
for every model (the uniform soup), ``normalize`` true — both as in mergekit. Differences from
mergekit: Σw = 0 with normalize is an error (mergekit divides by zero). Negative weights are
accepted as in mergekit; with ``conventions: paper`` they need ``normalize: false`` (a
normalized average with a negative weight is not an average).
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.errors import MethodError
from modelalloy.methods._sparsify import weighted_sum
from modelalloy.methods.registry import Execution, FusedKernel, MergeContext, Param, register_method


def _paper_weights(params: dict[str, Any], conventions: str, where: str) -> None:
    """With ``conventions: paper`` a normalized average takes no negative weight."""
    if conventions == "paper" and params["normalize"] and any(w < 0 for w in params["weight"]):
        raise MethodError(f"{where}: parameter 'weight' has a negative value "
                          f"{min(params['weight'])}; with conventions: paper negative weights "
                          "need normalize: false (mergekit's conventions accept them)")


@register_method(
    name="linear",
    params=[
        Param("weight", float, 1.0, "weight of this model in the average", per_model=True),
        Param("normalize", bool, True, "divide by the sum of the weights"),
    ],
    paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
    summary="Weighted average of the models (uniform soup with the default weights)",
    base="none",
    aliases=("average", "model_soup"),
    execution=Execution(shape="elementwise", kernel=FusedKernel("linear")),
    validate=_paper_weights,
)
def linear(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
           ctx: MergeContext) -> torch.Tensor:
    weights = params["weight"]
    normalize = params["normalize"]
    if normalize:
        total = float(sum(weights))
        if total == 0.0:
            raise MethodError(f"tensor '{ctx.name}': parameter 'weight' sums to 0, so the "
                              "normalized average is undefined; give a model a positive weight")
    out = weighted_sum(None, experts, weights)
    if normalize:
        out.div_(total)
    return out
