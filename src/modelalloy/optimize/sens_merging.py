"""Sens-Merging — Liu et al., "Sens-Merging: Sensitivity-Guided Parameter Balancing for Merging
Large Language Models", Findings of ACL 2025 (no official code; formulas from the third-party
reimplementation ZeroNLP/RCP-Merging ``sens_merging.py``, spec: uncertain-resolved.md §4).

A coefficient generator for task arithmetic: layer-wise, per-model weights from

1. sensitivity S_i^l = mean_{x∈D_i} Σ_{p∈l} Σ |θ_{i,p} ⊙ ∂L(x; θ_i)/∂θ_{i,p}| (per example);
2. task-specific factor α_i^l = S_i^l / ‖S_i‖₂ (L2 over the groups of model i);
3. cross-task alignment g_ij = mean_{x∈D_j} mean_tokens ‖z_{θ_i}(x) − z_{θ_j}(x)‖₂, g_ii = 0;
   τ_i = Σ_j g_ij (``direction="distance"``, the reimplementation) or Σ_j 1/(g_ij + ε)
   (``"similarity"``, the paper's stated intent), then τ_i ← τ_i / Σ_k τ_k;
4. σ_i^l = softmax_i(α_i^l τ_i / T);   θ^l = θ₀^l + λ Σ_i K σ_i^l τ_i^l.

Groups l: the block of a tensor in its layer stack (``model.layers.3``), else its module
(``model.embed_tokens``, ``model.norm``, ``lm_head``) — the reimplementation's "first three name
components" without naming an architecture. L = causal-LM cross-entropy (labels = inputs,
padding ignored) for sequence outputs, or cross-entropy against ``labels`` for classifiers
(``loss_fn`` overrides). Defaults: T = 1, λ = 1 (L2S used (λ, T) = (0.7, 2.0) for 7B).

The spec warns that with these normalisations the softmax inputs are ≈ 0.1/T, so K·σ stays near
1; :func:`sens_merging` returns the min/max of K·σ so a user can see whether the weights moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from modelalloy.optimize.adamerging import CoefficientResult
from modelalloy.plan.layers import split_layer
from modelalloy.stats.hooks import (
    batch_size_of,
    logits_of,
    select_example,
    split_batch,
    to_device,
    token_mask,
)


def layer_group(name: str) -> str:
    """The block of a tensor in its stack, else its module."""
    found = split_layer(name)
    if found is not None:
        stack, idx = found
        return f"{stack}.{idx}" if stack else str(idx)
    return name.rsplit(".", 1)[0] if "." in name else name


def default_loss(logits: torch.Tensor, inputs: Any, labels: Any) -> torch.Tensor:
    """Causal-LM cross-entropy (shifted, padding ignored) or classification cross-entropy."""
    if logits.dim() == 3:
        ids = inputs["input_ids"] if isinstance(inputs, Mapping) else labels
        target = ids[:, 1:].clone()
        mask = token_mask(inputs)
        if mask is not None:
            target[~mask[:, 1:]] = -100
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           target.reshape(-1), ignore_index=-100)
    if labels is None:
        raise ValueError("classification outputs need 'labels' in the batch (or a loss_fn)")
    return nn.functional.cross_entropy(logits.float(), labels)


def _call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), args=(), kwargs=dict(inputs), strict=False)
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return functional_call(model, dict(params), args=args, strict=False)


def sens_merging(model: nn.Module, base: Mapping[str, torch.Tensor],
                 experts: Sequence[Mapping[str, torch.Tensor]],
                 calibration: Sequence[Sequence[Any]], *, temperature: float = 1.0,
                 scale: float = 1.0, direction: str = "distance",
                 loss_fn: Callable[[torch.Tensor, Any, Any], torch.Tensor] | None = None,
                 device: str | torch.device | None = None
                 ) -> tuple[CoefficientResult, dict[str, Any]]:
    """Sens-Merging coefficients (layer-wise) and diagnostics (α, τ, g, min/max of K·σ)."""
    if direction not in ("distance", "similarity"):
        raise ValueError("direction must be 'distance' or 'similarity'")
    k_models = len(experts)
    if len(calibration) != k_models:
        raise ValueError("give one calibration set per expert")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    loss_fn = loss_fn or default_loss
    names = [n for n, p in model.named_parameters() if p.is_floating_point() and n in base]
    groups = sorted({layer_group(n) for n in names}, key=lambda g: names.index(
        next(n for n in names if layer_group(n) == g)))
    params_k = [{n: sd[n].detach().to(dev, torch.float32) for n in names} for sd in experts]
    was_training = model.training
    model.eval()
    # 1-2. per-example sensitivities, per group
    alpha = torch.zeros(k_models, len(groups), dtype=torch.float64)
    gidx = {n: groups.index(layer_group(n)) for n in names}
    for k in range(k_models):
        leaves = {n: params_k[k][n].clone().requires_grad_(True) for n in names}
        full = {**params_k[k], **leaves}
        sens = torch.zeros(len(groups), dtype=torch.float64)
        count = 0
        for batch in calibration[k]:
            inputs, labels = split_batch(batch)
            inputs, labels = to_device(inputs, dev), to_device(labels, dev)
            nb = batch_size_of(inputs)
            for i in range(nb):
                ex, lab = select_example(inputs, i, nb), select_example(labels, i, nb)
                loss = loss_fn(logits_of(_call(model, full, ex)), ex, lab)
                grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        sens[gidx[n]] += float((leaves[n].detach() * g).abs().sum())
                count += 1
        sens /= max(count, 1)
        norm = float(sens.norm())
        alpha[k] = sens / norm if norm > 0 else sens
    # 3-4. cross-task logit distances g_ij on D_j
    g = torch.zeros(k_models, k_models, dtype=torch.float64)
    with torch.no_grad():
        for j in range(k_models):
            for i in range(k_models):
                if i == j:
                    continue
                total, n_ex = 0.0, 0
                for batch in calibration[j]:
                    inputs, _ = split_batch(batch)
                    inputs = to_device(inputs, dev)
                    zi = logits_of(_call(model, params_k[i], inputs)).float()
                    zj = logits_of(_call(model, params_k[j], inputs)).float()
                    dist = (zi - zj).norm(dim=-1)  # (batch, tokens) or (batch,)
                    mask = token_mask(inputs)
                    if dist.dim() == 2 and mask is not None and mask.shape == dist.shape:
                        per_ex = (dist * mask).sum(1) / mask.sum(1).clamp_min(1)
                    else:
                        per_ex = dist.reshape(dist.shape[0], -1).mean(1)
                    total += float(per_ex.sum())
                    n_ex += per_ex.shape[0]
                g[i, j] = total / max(n_ex, 1)
    if direction == "distance":
        tau = g.sum(1)
    else:
        tau = (1.0 / (g + 1e-8) * (1 - torch.eye(k_models, dtype=g.dtype))).sum(1)
    tau = tau / tau.sum() if float(tau.sum()) > 0 else torch.full_like(tau, 1.0 / k_models)
    sigma = torch.softmax(alpha * tau[:, None] / temperature, dim=0)  # (K, groups)
    weights = scale * k_models * sigma
    model.train(was_training)
    coeffs = torch.stack([weights[:, gidx[n]] for n in names]).float()
    result = CoefficientResult("sens_merging", "layer", coeffs, names,
                               {n: i for i, n in enumerate(names)}, [], names, list(base.keys()))
    ks = k_models * sigma
    info = {"groups": groups, "alpha": alpha, "tau": tau, "g": g, "sigma": sigma,
            "k_sigma_min": float(ks.min()), "k_sigma_max": float(ks.max())}
    if math.isclose(info["k_sigma_min"], info["k_sigma_max"], rel_tol=0.05):
        info["warning"] = ("K·σ stays within 5% of uniform: Sens-Merging collapses to task "
                           "arithmetic with these normalisations (lower the temperature)")
    return result, info
