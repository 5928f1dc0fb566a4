"""Fisher merging — Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
NeurIPS 2022 (reference: mmatena/model_merging, ``merging.py::_merge_with_coeffs``).

Per parameter entry j::

    θ*_j = Σ_k λ_k F_{k,j} θ_{k,j} / Σ_k λ_k F_{k,j}

with F_k the diagonal Fisher of model k (collected per example by
:func:`modelalloy.stats.collect_fisher`). As in the reference:

- ``normalize`` (default true): λ_k ← λ_k / ‖F_k‖₂, the L2 norm of model k's Fisher over all
  merged tensors concatenated (computed in a ``prepare`` pass over the whole model);
- ``fisher_floor`` (1e-6) with ``favor_target`` (true): only model 0's (the target's) Fisher is
  clamped to ≥ floor, so entries where every Fisher vanishes fall back to the target; with
  ``favor_target`` false every Fisher is floored.

λ_k are the per-model ``weight`` values (the reference searches them on validation data).
Tensors for which no model has a Fisher get the λ-weighted average (the reference leaves them
at the target model's value; set weight to [1, 0, ...] to reproduce that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import torch

from modelalloy.errors import MethodError
from modelalloy.methods.registry import (
    Execution,
    MergeContext,
    Param,
    Prepare,
    TensorGroup,
    register_method,
)


def _fisher_norms(groups: Callable[[], Iterator[TensorGroup]]) -> list[float] | None:
    # Every tensor name counts once. A state dict that lists a tied parameter under two names
    # (lm_head = wte in memory) counts it twice; checkpoints store it once. (Deduplicating by
    # data pointer is unsafe while streaming: freed tensors' memory is reused.)
    sq: list[float] | None = None
    for group in groups():
        fishers = group.ctx.stats.get("fisher")
        if not fishers:
            continue
        if sq is None:
            sq = [0.0] * len(fishers)
        for i, f in enumerate(fishers):
            if f is not None:
                sq[i] += float((f.double() ** 2).sum())
    return None if sq is None else [s ** 0.5 for s in sq]


@register_method(
    name="fisher",
    params=[
        Param("weight", float, 1.0, "model coefficient λ_k", per_model=True, ge=0.0),
        Param("normalize", bool, True, "divide λ_k by the global L2 norm of model k's Fisher"),
        Param("fisher_floor", float, 1e-6, "lower clamp on the Fisher values", ge=0.0),
        Param("favor_target", bool, True, "floor only model 0's Fisher (the target model)"),
    ],
    paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022",
    summary="per-parameter average weighted by each model's diagonal Fisher",
    base="none", min_models=1, stats=("fisher",),
    execution=Execution(prepare=Prepare(_fisher_norms)))
def fisher(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
           ctx: MergeContext) -> torch.Tensor:
    """θ* = Σ λ_k F_k θ_k / Σ λ_k F_k. Defaults: λ_k = 1, normalize, floor 1e-6 on the
    target's Fisher. Reads ``ctx.stats["fisher"]``."""
    fishers = ctx.stats.get("fisher") or [None] * len(experts)
    lam = [float(w) for w in params["weight"]]
    if all(f is None for f in fishers):
        total = sum(lam)
        if total <= 0:
            raise MethodError("fisher: the model weights sum to zero")
        return cast(torch.Tensor, sum(w / total * t for w, t in zip(lam, experts, strict=True)))
    if any(f is None for f in fishers):
        missing = [i for i, f in enumerate(fishers) if f is None]
        raise MethodError(f"tensor '{ctx.name}': experts {missing} have no Fisher while others "
                          "do; collect statistics for every model")
    if params["normalize"]:
        norms = ctx.global_stats
        if norms is None:
            raise MethodError("fisher: the normalisation pass found no Fisher statistics")
        lam = [w / n if n > 0 else 0.0 for w, n in zip(lam, norms, strict=True)]
    floor = float(params["fisher_floor"])
    num = torch.zeros_like(experts[0])
    den = torch.zeros_like(experts[0])
    for k, (f, theta, w) in enumerate(zip(fishers, experts, lam, strict=True)):
        f = cast(torch.Tensor, f).to(theta.device)
        if not params["favor_target"] or k == 0:
            f = f.clamp_min(floor)
        num.add_(w * f * theta)
        den.add_(w * f)
    out = num / den
    return torch.where(den > 0, out, experts[0])
