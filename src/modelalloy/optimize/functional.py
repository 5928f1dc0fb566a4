"""A merged model rebuilt from (θ₀, task vectors, coefficients) inside every forward pass.

Shared by the coefficient learners (AdaMerging, ...): the module's own parameters are never
modified; :func:`torch.func.functional_call` swaps in ``θ₀ + Σ_k c_k τ_k`` built from trainable
coefficients, so gradients reach the coefficients and nothing else. Works on any ``nn.Module``
(Hugging Face or plain): no per-architecture code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from modelalloy.stats.hooks import call_model


class TaskVectorModel:
    """θ(λ) = θ₀ + Σ_k λ_{row(l), k} τ_k for the selected parameter tensors l.

    ``rows`` maps each merged tensor to a row of the coefficient matrix: all to row 0
    (task-wise) or one row per tensor (layer-wise). Tensors not selected keep θ₀ (the module's
    own values).
    """

    def __init__(self, model: nn.Module, base: Mapping[str, torch.Tensor],
                 experts: Sequence[Mapping[str, torch.Tensor]], *, exclude: str | None = None,
                 device: str | torch.device | None = None,
                 task_vectors: Sequence[Mapping[str, torch.Tensor]] | None = None):
        self.model = model
        dev = torch.device(device) if device is not None else next(
            iter(model.parameters())).device
        self.device = dev
        pattern = re.compile(exclude) if exclude else None
        names = []
        for name, p in model.named_parameters():
            if not p.is_floating_point() or name not in base:
                continue
            if pattern is not None and pattern.search(name):
                continue
            names.append(name)
        if not names:
            raise ValueError("no parameter of the model is found in the base state dict")
        self.names: list[str] = names
        self.base = {n: base[n].detach().to(dev, torch.float32) for n in names}
        if task_vectors is None:
            task_vectors = [{n: sd[n].detach().to(dev, torch.float32) - self.base[n]
                             for n in names} for sd in experts]
        self.tvs = [{n: tv[n].to(dev, torch.float32) for n in names} for tv in task_vectors]
        self.num_tasks = len(self.tvs)

    def params(self, coeffs: torch.Tensor, rows: Mapping[str, int]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            row = coeffs[rows[name]]
            t = self.base[name]
            for k in range(self.num_tasks):
                t = t + row[k] * self.tvs[k][name]
            out[name] = t
        return out

    def forward(self, coeffs: torch.Tensor, rows: Mapping[str, int], inputs: Any) -> Any:
        params = self.params(coeffs, rows)
        if isinstance(inputs, Mapping):
            return functional_call(self.model, params, args=(), kwargs=dict(inputs),
                                   strict=False)
        if isinstance(inputs, (tuple, list)):
            return functional_call(self.model, params, args=tuple(inputs), strict=False)
        return functional_call(self.model, params, args=(inputs,), strict=False)


def plain_forward(model: nn.Module, inputs: Any) -> Any:
    return call_model(model, inputs)


def ties_split(task_vectors: Sequence[Mapping[str, torch.Tensor]], density: float
               ) -> list[dict[str, torch.Tensor]]:
    """AdaMerging++'s TIES pre-processing (``ties_merging_split``): per task keep the top
    ``density`` fraction of |τ_k| over all merged tensors flattened together, elect a sign per
    entry from the sum of the trimmed vectors, and keep only the entries that agree with it.
    The per-task vectors are returned, not summed (AdaMerging weights them)."""
    names = list(task_vectors[0].keys())
    flats = torch.stack([torch.cat([tv[n].flatten() for n in names]) for tv in task_vectors])
    k = max(1, int(round(density * flats.shape[1])))
    trimmed = torch.zeros_like(flats)
    for i in range(flats.shape[0]):
        # keep the k largest magnitudes (reference: kthvalue of |τ| on the "dropped" side)
        thresh = flats[i].abs().kthvalue(flats.shape[1] - k + 1).values if k < flats.shape[
            1] else flats[i].abs().min()
        trimmed[i] = flats[i] * (flats[i].abs() >= thresh)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = 1.0  # reference: majority sign for ties at 0
    kept = trimmed * ((torch.sign(trimmed) == sign) & (trimmed != 0))
    out = []
    for i in range(flats.shape[0]):
        d, offset = {}, 0
        for n in names:
            size = task_vectors[0][n].numel()
            d[n] = kept[i, offset:offset + size].reshape(task_vectors[0][n].shape)
            offset += size
        out.append(d)
    return out
