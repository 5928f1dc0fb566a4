"""Expert Merging and Expert Merging++ — Zhang et al., "Expert Merging: Model Merging with
Unsupervised Expert Alignment and Importance-Guided Layer Chunking", ICLR 2026 (reference:
Littleor/ExpertMerging, ``global_utils/expert_merging_base.py``, ``merging_utils.py``).

Learns layer-wise (or chunk-wise) task-vector coefficients on a handful of unlabelled samples
per expert domain, aligning the merged model with the expert of each sample's domain::

    α = sigmoid(w),  w initialised at logit(ᾱ)          (ᾱ: init, default 0.1)
    θ^l = θ₀^l + Σ_k Σ_s α_{k,l,s} τ_{k,l,s}           (chunks: torch.chunk of the flat tensor)
    L_logit = T² · mean_positions[ −Σ_v softmax(z_k/T)_v · log softmax(z/T)_v ]
    L_hid   = mean_{ℓ∈S} MSE(h_ℓ(x; θ), h_ℓ(x; θ_k))
    L = β_k (L_logit + w_hid · L_hid) + γ · Σ |α − ᾱ| / (n_coeffs / K)

Defaults (repo CLI): AdamW lr 0.5 on the logits w, weight decay 1e-5, betas (0.9, 0.999),
CosineAnnealingWarmRestarts(T_0=50, T_mult=2, η_min=0.1·lr), gradient clipping 1.0 on the
coefficients, gradient accumulation 8, 1 epoch, T = 1, γ = 5, w_hid = 1, batch size 1, tasks
interleaved round-robin. Excluded from merging (they stay at the base): norms, biases,
embeddings, lm_head (``exclude`` regex).

Hidden states are read with forward hooks on the blocks of the model's block stack (the longest
numbered ModuleList/Sequential) — any module, no ``output_hidden_states`` needed; ``hidden_layers``
are block indices (default: every block). The teacher for domain k is the same module run with
expert k's parameters (``functional_call``), evaluated once per sample before training.

Expert Merging++: :func:`allocate_chunks` turns a layer-wise result into per-tensor chunk counts
m_l = ⌊B · I_l^κ / Σ_j I_j^κ⌋ with I_l = ℓ1-normalised Σ_k |α_k^l| · mean|τ_k^l| · n_l; run
:func:`expert_merging` again with ``chunks=``. Layer-wise results are written as a
``task_arithmetic`` recipe; chunk-wise ones as ``merge_coeffs`` statistics for the
``chunk_task_arithmetic`` method.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from modelalloy.methods.chunked import chunk_scale
from modelalloy.optimize.adamerging import CoefficientResult
from modelalloy.stats.collect import Statistic
from modelalloy.stats.hooks import logits_of, progress, split_batch, to_device, token_mask
from modelalloy.stats.regmean_pp import find_block_stack

DEFAULT_EXCLUDE = r"(norm|\bln|ln_|bias|embed|wte|wpe|lm_head)"


@dataclass
class ExpertMergingResult:
    """Learned α per tensor and expert: ``alphas[name]`` has shape (K, m_l)."""

    alphas: dict[str, torch.Tensor]
    history: list[float] = field(default_factory=list)
    all_names: list[str] = field(default_factory=list)

    @property
    def layer_wise(self) -> bool:
        return all(a.shape[1] == 1 for a in self.alphas.values())

    def to_coefficients(self) -> CoefficientResult:
        """Layer-wise result as a CoefficientResult (recipe, heatmap)."""
        if not self.layer_wise:
            raise ValueError("chunk-wise coefficients: use to_statistics()")
        names = list(self.alphas)
        coeffs = torch.stack([self.alphas[n][:, 0] for n in names])
        return CoefficientResult("expert_merging", "layer", coeffs, names,
                                 {n: i for i, n in enumerate(names)}, self.history, names,
                                 self.all_names)

    def save_recipe(self, path: str | Path, base_model: str, models: Sequence[str]) -> Path:
        return self.to_coefficients().save_recipe(path, base_model, models)

    def to_statistics(self) -> list[Statistic]:
        """One ``merge_coeffs`` statistic per expert (for ``chunk_task_arithmetic``)."""
        k_models = next(iter(self.alphas.values())).shape[0]
        return [Statistic("merge_coeffs", {n: a[k].clone() for n, a in self.alphas.items()},
                          {}, {}, {"method": "expert_merging"}) for k in range(k_models)]


def _as_list(value: float | Sequence[float], k: int) -> list[float]:
    return [float(v) for v in value] if isinstance(value, Sequence) else [float(value)] * k


def expert_merging(model: nn.Module, base: Mapping[str, torch.Tensor],
                   experts: Sequence[Mapping[str, torch.Tensor]],
                   task_samples: Sequence[Sequence[Any]], *,
                   init: float | Sequence[float] = 0.1, chunks: Mapping[str, int] | None = None,
                   hidden_layers: Sequence[int] | None = None, lr: float = 0.5,
                   weight_decay: float = 1e-5, epochs: int = 1, grad_accum: int = 8,
                   grad_clip: float = 1.0, temperature: float = 1.0, gamma: float = 5.0,
                   w_hid: float = 1.0, task_weights: Sequence[float] | None = None,
                   exclude: str | None = DEFAULT_EXCLUDE, device: str | torch.device | None = None,
                   show_progress: bool = False) -> ExpertMergingResult:
    """Learn Expert Merging coefficients (see the module docstring).

    ``task_samples[k]`` are the unlabelled samples (batches of one, as the reference) of expert
    k's domain. ``chunks`` maps tensor names to m_l (1 = layer-wise, the default; ≤ 0 = fixed at
    the init, not trained).
    """
    k_models = len(experts)
    if len(task_samples) != k_models:
        raise ValueError("give one list of samples per expert")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    pattern = re.compile(exclude) if exclude else None
    names = [n for n, p in model.named_parameters()
             if p.is_floating_point() and n in base and not (pattern and pattern.search(n))]
    if not names:
        raise ValueError("no tensor left to merge after `exclude`")
    theta0 = {n: base[n].detach().to(dev, torch.float32) for n in names}
    taus = [{n: sd[n].detach().to(dev, torch.float32) - theta0[n] for n in names}
            for sd in experts]
    init_k = _as_list(init, k_models)
    beta = _as_list(task_weights, k_models) if task_weights is not None else [1.0] * k_models
    sizes = {n: int((chunks or {}).get(n, 1)) for n in names}
    raw: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    init_t: dict[str, torch.Tensor] = {}
    for n in names:
        m = sizes[n]
        start = torch.tensor(init_k, device=dev)[:, None].expand(k_models, max(m, 1))
        init_t[n] = start.clone()
        if m <= 0:
            fixed[n] = start.clone()
        else:
            raw[n] = torch.logit(start.clamp(1e-6, 1 - 1e-6)).clone().requires_grad_(True)
    n_trainable = sum(t.numel() for t in raw.values())
    blocks = find_block_stack(model)[1]
    layers = list(range(len(blocks))) if hidden_layers is None else list(hidden_layers)
    hooked = [model.get_submodule(blocks[i]) for i in layers]

    def alphas() -> dict[str, torch.Tensor]:
        return {**{n: torch.sigmoid(w) for n, w in raw.items()}, **fixed}

    def merged_params(al: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            t = theta0[n]
            numel = t.numel()
            for k in range(k_models):
                scale = chunk_scale(numel, al[n][k]).reshape(t.shape)
                t = t + scale * taus[k][n]
            out[n] = t
        return out

    def run(params: Mapping[str, torch.Tensor], inputs: Any) -> tuple[torch.Tensor,
                                                                        list[torch.Tensor]]:
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, (tuple, list)) else out)

        handles = [m.register_forward_hook(hook) for m in hooked]
        try:
            if isinstance(inputs, Mapping):
                out = functional_call(model, dict(params), args=(), kwargs=dict(inputs),
                                      strict=False)
            else:
                args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
                out = functional_call(model, dict(params), args=args, strict=False)
        finally:
            for h in handles:
                h.remove()
        return logits_of(out), captured

    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    # round-robin interleaving of the domains ("balanced" loader), teacher outputs precomputed
    order: list[tuple[int, Any]] = []
    for i in range(max(len(s) for s in task_samples)):
        for k in range(k_models):
            if i < len(task_samples[k]):
                order.append((k, task_samples[k][i]))
    teachers = []
    with torch.no_grad():
        for k, sample in order:
            inputs, _ = split_batch(sample)
            inputs = to_device(inputs, dev)
            expert_params = {n: theta0[n] + taus[k][n] for n in names}
            z, hs = run(expert_params, inputs)
            teachers.append((z.float(), [h.float() for h in hs]))
    opt = torch.optim.AdamW(list(raw.values()), lr=lr, betas=(0.9, 0.999),
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=50, T_mult=2,
                                                                 eta_min=0.1 * lr)
    history: list[float] = []
    t2 = temperature ** 2
    try:
        step_in_accum = 0
        for _epoch in range(epochs):
            running = 0.0
            for (k, sample), (z_t, h_t) in progress(zip(order, teachers, strict=True),
                                                    show_progress, "expert merging",
                                                    total=len(order)):
                inputs, _ = split_batch(sample)
                inputs = to_device(inputs, dev)
                al = alphas()
                z, hs = run(merged_params(al), inputs)
                p_t = torch.softmax(z_t / temperature, -1)
                ce = -(p_t * torch.log_softmax(z.float() / temperature, -1)).sum(-1)
                mask = token_mask(inputs)
                if mask is not None and tuple(mask.shape) == tuple(ce.shape):
                    l_logit = t2 * (ce * mask).sum() / mask.sum().clamp_min(1)
                else:
                    l_logit = t2 * ce.mean()
                l_hid = (sum(torch.nn.functional.mse_loss(h.float(), ht)
                             for h, ht in zip(hs, h_t, strict=True)) / max(len(hs), 1)
                         if hs else torch.zeros((), device=dev))
                reg = sum((al[n] - init_t[n]).abs().sum() for n in raw) / max(
                    n_trainable / k_models, 1)
                loss = beta[k] * (l_logit + w_hid * l_hid) + gamma * reg
                (loss / grad_accum).backward()
                running += float(loss.detach())
                step_in_accum += 1
                if step_in_accum == grad_accum:
                    torch.nn.utils.clip_grad_norm_(list(raw.values()), grad_clip)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                    step_in_accum = 0
            if step_in_accum:
                torch.nn.utils.clip_grad_norm_(list(raw.values()), grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad()
                step_in_accum = 0
            history.append(running / max(len(order), 1))
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    final = {n: a.detach().cpu() for n, a in alphas().items()}
    return ExpertMergingResult({n: final[n] for n in names}, history, list(base.keys()))


def allocate_chunks(result: ExpertMergingResult, base: Mapping[str, torch.Tensor],
                    experts: Sequence[Mapping[str, torch.Tensor]], *, budget: float,
                    kappa: float = 1.0) -> dict[str, int]:
    """Expert Merging++ chunk counts from a layer-wise result.

    I_l = Σ_k |α_k^l| · mean|τ_k^l| · n_l, ℓ1-normalised over tensors;
    m_l = ⌊B · I_l^κ / Σ_j I_j^κ⌋ (B = ``budget``, the per-task coefficient budget, reported
    0.9–1.2× the number of layer-wise coefficients; κ = 0 is near-uniform). Tensors with
    m_l = 0 keep a fixed coefficient (returned as 0: pass the dict as ``chunks``).
    """
    if not result.layer_wise:
        raise ValueError("allocate_chunks needs a layer-wise result")
    imp = {}
    for n, a in result.alphas.items():
        n_l = base[n].numel()
        imp[n] = sum(abs(float(a[k, 0])) * float((sd[n].float() - base[n].float()).abs().mean())
                     * n_l for k, sd in enumerate(experts))
    total = sum(imp.values()) or 1.0
    imp = {n: v / total for n, v in imp.items()}
    powered = {n: v ** kappa if v > 0 else 0.0 for n, v in imp.items()}
    denom = sum(powered.values()) or 1.0
    return {n: int(math.floor(budget * v / denom)) for n, v in powered.items()}
