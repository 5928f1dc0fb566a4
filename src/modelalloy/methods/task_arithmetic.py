"""Task arithmetic.

``task_arithmetic`` — Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023
(arXiv 2212.04089).

    τ_t = θ_t − θ_0,        θ = θ_0 + λ Σ_t w_t τ_t

(divided by Σ_t w_t first when ``normalize: true``). Defaults: ``weight`` 1 per model,
``lambda`` 1, ``normalize`` false (as in mergekit, where ``lambda`` is also the global scale).
Weights and λ may be negative: θ_0 − λτ is the paper's task negation ("forgetting").
With w_t = 1 and λ = 1/T this is the plain average of the experts.

Recipe example — the instruction/chat vector added to a continually pre-trained model
(Hirano & Imajo, arXiv 2409.19854; Chat Vector, Huang et al., arXiv 2310.04799):
θ = θ_base + τ_CPT + τ_inst = θ_CPT + (θ_inst − θ_base), i.e. task arithmetic with weights
[1, 1]::

    merge_method: task_arithmetic
    base_model: org/base-14b
    models:
      - model: org/base-14b-domain-cpt       # continual pre-training on the domain
        parameters: {weight: 1.0}
      - model: org/base-14b-instruct         # the public instruct model of the same base
        parameters: {weight: 1.0}
    parameters: {lambda: 1.0}
    dtype: bfloat16

Differences from mergekit: none in the math (fp32 accumulation; mergekit works in the storage
dtype); ``int8_mask`` and ``rescale`` are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

import torch

from modelalloy.methods._sparsify import (
    INT8_MASK,
    lambda_param,
    normalize_param,
    weight_param,
    weighted_sum,
)
from modelalloy.methods._taskvec import need_base
from modelalloy.methods.registry import Execution, FusedKernel, MergeContext, Param, register_method

# mergekit accepts ``rescale`` for every task-arithmetic method; without sparsification it has
# nothing to rescale.
RESCALE_NOOP = Param("rescale", bool, False, "accepted for mergekit recipes; no effect here")


@register_method(
    name="task_arithmetic",
    paper_settings={"lambda": 0.3},
    params=[weight_param(), lambda_param(allow_negative=True),
            normalize_param(False), RESCALE_NOOP, INT8_MASK],
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)",
    summary="Add the scaled sum of task vectors to the base (θ0 + λ Σ w τ)",
    base="required",
    aliases=("chat_vector",),
    execution=Execution(shape="elementwise", kernel=FusedKernel("task_arithmetic")),
)
def task_arithmetic(base: torch.Tensor | None, experts: list[torch.Tensor],
                    params: dict[str, Any], ctx: MergeContext) -> torch.Tensor:
    weights = params["weight"]
    scale = float(params["lambda"])
    if params["normalize"]:
        total = float(sum(weights))
        if abs(total) >= 1e-8:
            scale /= total
    acc = weighted_sum(base, experts, weights)
    if scale != 1.0:
        acc.mul_(scale)
    return acc.add_(need_base(base, "task_arithmetic", ctx.name))
