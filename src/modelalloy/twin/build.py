"""Build a Twin-Merging bundle from a base, experts and labelled-by-task router inputs.

    θ* = Merge(θ₀, {θ_k})                       (shared expert: TA or TIES)
    δ_k = θ_k − θ*;  δ̂_k = SVD_r(δ_k) for 2-D tensors, δ_k dense for the others
    router: MLP on e(x) (mean last hidden state of θ*), cross-entropy on the task of x
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from modelalloy.errors import MethodError
from modelalloy.stats.hooks import split_batch
from modelalloy.twin.bundle import TwinBundle
from modelalloy.twin.lowrank import check_density, truncate
from modelalloy.twin.router import train_router
from modelalloy.twin.runtime import Factor, embed
from modelalloy.twin.shared import SHARED_DEFAULTS, shared_expert


def exclusive_factors(shared: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor],
                      density: float, exclude: str | None = None) -> dict[str, Factor]:
    """{name: δ̂} for every floating tensor where the expert differs from θ*."""
    pattern = re.compile(exclude) if exclude else None
    out: dict[str, Factor] = {}
    for name, s in shared.items():
        if not s.is_floating_point() or (pattern is not None and pattern.search(name)):
            continue
        delta = expert[name].to(torch.float32) - s.to(torch.float32)
        if not bool(delta.any()):
            continue
        out[name] = truncate(delta, density) if delta.dim() == 2 else delta.contiguous()
    return out


def _call_args(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    inputs, _labels = split_batch(batch)
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


@torch.no_grad()
def router_embeddings(model: nn.Module, data: Mapping[str, Iterable[Any]], tasks: list[str]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e(x), task index) for every input of every task's batches, on ``model`` (θ*)."""
    missing = [t for t in tasks if t not in data]
    if missing:
        raise MethodError(f"twin_merging: no router data for tasks {missing}")
    embs, labels = [], []
    for k, task in enumerate(tasks):
        for batch in data[task]:
            args, kwargs = _call_args(batch)
            e = embed(model, args, kwargs)
            embs.append(e)
            labels.append(torch.full((len(e),), k, dtype=torch.long))
    if not embs:
        raise MethodError("twin_merging: the router data is empty")
    return torch.cat(embs), torch.cat(labels)


def build_bundle(base: Mapping[str, torch.Tensor],
                 experts: Mapping[str, Mapping[str, torch.Tensor]],
                 module: nn.Module, router_data: Mapping[str, Iterable[Any]], *,
                 shared_method: str = "task_arithmetic",
                 shared_params: Mapping[str, Any] | None = None, density: float = 0.1,
                 exclude: str | None = None, router_epochs: int = 50, router_lr: float = 5e-4,
                 router_batch: int = 1024, router_holdout: float = 0.2,
                 router_hidden: int | None = None, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> TwinBundle:
    """The bundle of ``experts`` (task name -> state dict) over ``base``.

    ``module`` is a model of the architecture (its weights are replaced by θ*);
    ``router_data[task]`` yields batches as the model takes them (a tensor, a tuple, or a
    dict such as ``{"input_ids", "attention_mask"}``) drawn from that task.
    """
    log = log or (lambda _m: None)
    tasks = list(experts)
    if len(tasks) < 2:
        raise MethodError("twin_merging: needs at least two experts")
    check_density(density)
    theta = shared_expert(shared_method, base, [experts[t] for t in tasks], shared_params, seed)
    log(f"twin: shared expert ({shared_method}) merged")
    factors = {t: exclusive_factors(theta, experts[t], density, exclude) for t in tasks}
    log(f"twin: exclusive knowledge of {len(tasks)} experts compressed (density {density})")
    missing, unexpected = module.load_state_dict(theta, strict=False)
    if unexpected:
        raise MethodError(f"twin_merging: the model has no tensors {list(unexpected)[:3]}")
    module.eval()
    embs, labels = router_embeddings(module, router_data, tasks)
    router, report = train_router(embs, labels, len(tasks), epochs=router_epochs, lr=router_lr,
                                  batch_size=router_batch, holdout=router_holdout, seed=seed,
                                  hidden=router_hidden)
    log(f"twin: router trained on {report.examples} inputs, held-out accuracy "
        f"{report.holdout_accuracy:.3f} (epoch {report.best_epoch})")
    config = {"shared_method": shared_method,
              "shared_params": {**SHARED_DEFAULTS[shared_method], **dict(shared_params or {})},
              "density": density, "exclude": exclude, "seed": seed,
              "router": {"hidden": router.hidden, "epochs": router_epochs, "lr": router_lr,
                         "batch": router_batch,
                         "holdout": router_holdout, "train_accuracy": report.train_accuracy,
                         "holdout_accuracy": report.holdout_accuracy,
                         "best_epoch": report.best_epoch, "examples": report.examples}}
    del missing
    return TwinBundle(tasks=tasks, shared=theta, factors=factors, router=router, config=config)
