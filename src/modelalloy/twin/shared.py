"""The shared expert θ* of Twin-Merging: a static merge of every expert.

The one place Twin-Merging merges weights, so that moving to the in-memory executor is one edit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modelalloy.errors import MethodError

SHARED_METHODS = ("task_arithmetic", "ties")
# Our suites' static rows use these (docs/benchmarks.md); the paper's RoBERTa runs use TA λ=0.29.
SHARED_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0},
}


def shared_expert(method: str, base: Mapping[str, torch.Tensor],
                  experts: Sequence[Mapping[str, torch.Tensor]],
                  params: Mapping[str, Any] | None = None, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """θ* = TA or TIES of the experts over ``base`` (the paper's shared expert)."""
    if method not in SHARED_METHODS:
        raise MethodError(f"twin_merging: the shared expert is one of "
                          f"{', '.join(SHARED_METHODS)}, got '{method}'")
    from modelalloy.api import merge_state_dicts

    given = {**SHARED_DEFAULTS[method], **dict(params or {})}
    return merge_state_dicts(method, base, list(experts), seed=seed, **given)
