"""OPCM as a recipe method: the continual merge run over the recipe's models in order.

The math lives in :mod:`modelalloy.continual` (see there for the paper and equations). Through
the recipe runner, ``prepare`` streams the models one at a time (model t and the base are read
tensor by tensor in pass t) and keeps only the running merged task vector (float32, one model)
and the tensor at hand, whatever the number of experts: neither the base nor the incoming
model is held whole. The main pass then returns θ_0 + that vector.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from modelalloy.continual import DEFAULT_EXCLUDE, OPCMSteps, task_vector
from modelalloy.methods._taskvec import GroupsFactory, need_base
from modelalloy.methods.registry import Execution, MergeContext, Param, Prepare, register_method


def _task_vectors(groups: GroupsFactory, idx: int,
                  device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Model ``idx``'s task vectors, one tensor at a time (its base tensor read with it)."""
    for g in groups():
        yield g.name, task_vector(need_base(g.base, "opcm", g.name), g.experts[idx], device)


def _prepare(groups: GroupsFactory) -> dict[str, Any] | None:
    first = next(iter(groups()), None)
    if first is None:
        return None
    params = first.params  # the same for every tensor: the planner checks it (uniform=True)
    order = list(range(len(first.experts)))
    if params["shuffle"]:
        random.Random(first.ctx.seed).shuffle(order)
    merger = OPCMSteps(alpha=params["alpha"], exclude=params["exclude"],
                       device=need_base(first.base, "opcm", first.name).device)
    for idx in order:  # one pass per model; only the running merge is kept between tensors
        merger.add_task_vectors(_task_vectors(groups, idx, merger.device))
    return {"delta": merger.delta, "order": order, "norms": merger.norms}


@register_method(
    name="opcm",
    params=[
        Param("alpha", float, 0.5, "α: energy fraction of the merged delta's singular values "
              "whose subspace is protected (FusionBench default 0.5)", ge=0.0, le=1.0),
        Param("shuffle", bool, False, "shuffle the model order with the recipe seed (the "
              "official default shuffles; here the recipe order is kept unless asked)"),
        Param("exclude", str, DEFAULT_EXCLUDE, "regex: 2-D tensors treated as non-linear (no "
              "projection); embeddings by default"),
    ],
    paper="Tang et al., Merging Models on the Fly Without Retraining: A Sequential Approach to "
          "Scalable Continual Model Merging, 2025 (arXiv 2501.09522)",
    summary="Continual merging: each new task vector is projected out of the merged delta's "
            "dominant singular subspace, and the merge is rescaled to the mean task-vector norm",
    base="required",
    execution=Execution(prepare=Prepare(_prepare)),
    uniform=True,
)
def opcm(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
         ctx: MergeContext) -> torch.Tensor:
    """θ = θ_0 + θ^(T) − θ_0 from the sequential OPCM pass in ``prepare``.

    Needs beyond one tensor: all models in sequence and the whole-model norms (``prepare``);
    for a stream of checkpoints use ``modelalloy merge-stream`` or
    :class:`modelalloy.continual.OPCM`.
    """
    base = need_base(base, "opcm", ctx.name)
    stats = ctx.global_stats
    if stats is None:
        from modelalloy.errors import MethodError

        raise MethodError("opcm needs its prepare pass; run it through merge_state_dicts, a "
                          "recipe, or modelalloy.continual.OPCM")
    return base + stats["delta"][ctx.name].to(base.device)
