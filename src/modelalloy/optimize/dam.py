"""DAM — Defense-Aware Merging (Yang et al., "Mitigating the Backdoor Effect for Multi-Task
Model Merging via Safety-Aware Subspace", ICLR 2025; reference: Yangjinluan/DAM,
``clip_safe_concrete_adamerging.py``).

Backdoored experts pass their backdoor to a merge (succession) and to the other tasks
(transfer). DAM learns, with unlabelled data only and no knowledge of the trigger, a mask over
the task-vector parameters that keeps what the tasks share and drops what a trigger exploits,
then merges θ = θ₀ + Σ_k λ_k (m ⊙ τ_k). What the official code does (the paper's "dual masks"
are one concrete mask shared by all tasks there, with an adversarial universal perturbation ε_k
per task standing in for the unknown trigger — we follow the code)::

    Z: mask logits (one per task-vector entry, init 0);  ε_k: per task (init 0);  λ init 0.3
    each step:
      m = concrete(Z, T=0.5) = σ((Z + log u − log(1−u)) / T),  u ~ U(0,1);  m ← m / mean(m)
      (1) inner:     λ' = one Adam step on Σ_k H(f_{θ(λ0, m)}(x_k)) from λ0   (m detached)
      (2) adversary: ε_k += Adam step ascending CE(f_θ(x_k + ε_k), argmax f_θ(x_k))  (θ fixed)
      (3) outer:     Z −= Adam step on Σ_k [H(f_{θ(λ', m)}(x_k)) + β·H(f_{θ(λ', m)}(x_k + ε_k))]
    after: m = σ(Z) rescaled to mean 1 per tensor (the continuous mask, eval_mask_type), then
    AdaMerging of the masked task vectors m ⊙ τ_k learns the final λ.

H is the Shannon entropy of the predictions. ε perturbs the input where inputs are continuous
(images, clipped to [0, 1] as the reference clips pixels) and the input embeddings of a language
model (a universal vector added at every position; token triggers are discrete, so the
perturbation lives where the trigger's effect enters the network).

With the mask at its initial logits (Z = 0) every m is 1 after rescaling, so DAM without mask
steps is task arithmetic with λ0 (or AdaMerging, with AdaMerging steps).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modelalloy.optimize.adamerging import _cycle, adamerging, entropy_of_logits
from modelalloy.stats.hooks import logits_of, split_batch, token_mask


@dataclass
class DamResult:
    masks: dict[str, torch.Tensor]  # the continuous mask per tensor (mean 1)
    coefficients: torch.Tensor  # (rows, K) from the final AdaMerging (or λ0)
    merged: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


def concrete(logits: torch.Tensor, temperature: float, gen: torch.Generator | None
             ) -> torch.Tensor:
    """A relaxed-Bernoulli sample σ((Z + log u − log(1 − u)) / T)."""
    u = torch.rand(logits.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + u.log() - (1 - u).log()) / temperature)


def rescale(m: torch.Tensor) -> torch.Tensor:
    """m / mean(m) per tensor (the reference rescales so the mask keeps the vector's scale)."""
    return m / m.mean().clamp_min(1e-12)


def _call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), args=(), kwargs=dict(inputs), strict=False)
    return functional_call(model, dict(params), args=(inputs,), strict=False)


class _Perturbed:
    """Adds ε to a batch's continuous input, or to the input embeddings of a language model."""

    def __init__(self, model: nn.Module, sample: Any) -> None:
        self.model = model
        inputs = sample if not isinstance(sample, Mapping) else dict(sample)
        self.key = None
        if isinstance(inputs, Mapping):
            self.key = next((k for k, v in inputs.items()
                             if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        elif isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            self.key = ""
        self.embeddings = None
        if self.key is None:
            get = getattr(model, "get_input_embeddings", None)
            self.embeddings = get() if callable(get) else None
            if self.embeddings is None:
                raise ValueError("DAM: no continuous input and no input embeddings to perturb")

    def shape(self, inputs: Any) -> tuple[int, ...]:
        if self.embeddings is not None:
            return (int(self.embeddings.weight.shape[1]),)
        x = inputs if self.key == "" else inputs[self.key]
        return tuple(x.shape[1:])

    def run(self, params: Mapping[str, torch.Tensor], inputs: Any, eps: torch.Tensor) -> Any:
        if self.embeddings is not None:
            handle = self.embeddings.register_forward_hook(lambda _m, _a, out: out + eps)
            try:
                return _call(self.model, params, inputs)
            finally:
                handle.remove()
        if self.key == "":
            return _call(self.model, params, (inputs + eps).clamp(0, 1))
        moved = dict(inputs)
        moved[self.key] = (inputs[self.key] + eps).clamp(0, 1)
        return _call(self.model, params, moved)


FINAL_MASKS = ("sample", "expected")


def _rows(names: Sequence[str], granularity: str) -> dict[str, int]:
    """Coefficient row of each tensor: one shared row (task-wise) or one per tensor."""
    if granularity not in ("task", "layer"):
        raise ValueError("DAM: granularity must be 'task' or 'layer'")
    return {n: (0 if granularity == "task" else i) for i, n in enumerate(names)}


def final_mask(logits: Mapping[str, torch.Tensor], kind: str, temperature: float,
               gen: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The mask the merge uses, rescaled to mean 1 per tensor: one concrete sample of Z
    (``"sample"``, the official code's ``sample_mask("continuous")``) or σ(Z) (``"expected"``)."""
    if kind not in FINAL_MASKS:
        raise ValueError(f"DAM: final_mask must be one of {FINAL_MASKS}, not '{kind}'")
    if kind == "sample":
        return {n: rescale(concrete(z.detach(), temperature, gen)) for n, z in logits.items()}
    return {n: rescale(torch.sigmoid(z.detach())) for n, z in logits.items()}


def dam(model: nn.Module, base: Mapping[str, torch.Tensor],
        experts: Sequence[Mapping[str, torch.Tensor]], task_batches: Sequence[Sequence[Any]],
        *, mask_steps: int = 1000, mask_lr: float = 1e-3, base_lr: float = 1.0,
        adv_lr: float = 1e-4, adv_weight: float = 0.1, temperature: float = 0.5,
        init: float = 0.3, adamerging_steps: int = 1000, adamerging_lr: float = 1e-3,
        granularity: str = "layer", final: str = "sample", fresh_batches: bool = True,
        seed: int = 0) -> DamResult:
    """Learn DAM's mask and coefficients; ``task_batches[k]`` are unlabelled batches of task
    k (as AdaMerging takes them). Returns the masks, coefficients and merged state dict.

    Defaults are the official layer-wise configuration (``clip_safe_concrete_layer_wise_
    adamerging.yaml``): 1000 mask steps then 1000 AdaMerging steps, λ per tensor for both, each
    of a step's three phases on its own batches (``fresh_batches``), the inner λ optimiser's
    Adam state kept across steps while λ restarts from λ0, and the merge's mask one concrete
    sample of Z (``final="sample"``; ``"expected"`` uses σ(Z)).
    """
    names = [n for n, p in model.named_parameters()
             if p.is_floating_point() and n in base]
    rows = _rows(names, granularity)
    n_rows = max(rows.values()) + 1 if rows else 1
    if final not in FINAL_MASKS:
        raise ValueError(f"DAM: final must be one of {FINAL_MASKS}, not '{final}'")
    theta0 = {n: base[n].detach().float() for n in names}
    tvs = [{n: sd[n].detach().float() - theta0[n] for n in names} for sd in experts]
    k_tasks = len(experts)
    logits_z = {n: torch.zeros_like(theta0[n], requires_grad=True) for n in names}
    opt_z = torch.optim.Adam(list(logits_z.values()), lr=mask_lr)
    # λ restarts from λ0 at every step, but its optimiser (and Adam state) lives across steps
    lam = torch.full((n_rows, k_tasks), init, requires_grad=True)
    opt_l = torch.optim.Adam([lam], lr=base_lr)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    streams = [_cycle(list(b), rng) for b in task_batches]
    first = [split_batch(list(b)[0])[0] for b in task_batches]
    pert = _Perturbed(model, first[0])
    eps = [torch.zeros(pert.shape(first[k]), requires_grad=True) for k in range(k_tasks)]
    opt_eps = torch.optim.Adam(eps, lr=adv_lr)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    history: list[dict[str, float]] = []

    def params(c: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: theta0[n] + sum(c[rows[n], k] * masks[n] * tvs[k][n]
                                   for k in range(k_tasks)) for n in names}

    def draw(previous: list[Any] | None = None) -> list[Any]:
        if previous is not None and not fresh_batches:
            return previous
        return [split_batch(next(s))[0] for s in streams]

    try:
        for _step in range(mask_steps):
            sample = {n: rescale(concrete(z, temperature, gen)) for n, z in logits_z.items()}
            fixed = {n: m.detach() for n, m in sample.items()}
            # (1) inner: one Adam step on λ from λ0, mask fixed
            batch = draw()
            with torch.no_grad():
                lam.fill_(init)
            inner = sum(entropy_of_logits(logits_of(_call(model, params(lam, fixed), x)),
                                          token_mask(x)) for x in batch)
            opt_l.zero_grad()
            inner.backward()
            opt_l.step()
            lam_new = lam.detach().clamp(0, 1)
            # (2) adversary: ε ascends the CE against the clean predictions (θ fixed)
            batch = draw(batch)
            theta = {n: t.detach() for n, t in params(lam_new, fixed).items()}
            adv = 0.0
            for k, x in enumerate(batch):
                with torch.no_grad():
                    clean = logits_of(_call(model, theta, x)).argmax(-1)
                out = logits_of(pert.run(theta, x, eps[k]))
                adv = adv - F.cross_entropy(out.reshape(-1, out.shape[-1]).float(),
                                            clean.reshape(-1))
            opt_eps.zero_grad()
            adv.backward()
            opt_eps.step()
            # (3) outer: the mask, through the concrete sample
            batch = draw(batch)
            theta = params(lam_new, sample)
            outer = sum(entropy_of_logits(logits_of(_call(model, theta, x)), token_mask(x))
                        + adv_weight * entropy_of_logits(
                            logits_of(pert.run(theta, x, eps[k].detach())), token_mask(x))
                        for k, x in enumerate(batch))
            opt_z.zero_grad()
            outer.backward()
            opt_z.step()
            history.append({"inner": float(inner.detach()), "adv": float(-adv.detach()),
                            "outer": float(outer.detach())})
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    masks = final_mask(logits_z, final, temperature, gen)
    masked = [{n: (theta0[n] + masks[n] * tvs[k][n]).to(base[n].dtype) if n in masks
               else base[n] for n in base} for k in range(k_tasks)]
    if adamerging_steps > 0:
        res = adamerging(model, base, masked, task_batches, granularity=granularity,
                         steps=adamerging_steps, lr=adamerging_lr, init=init,
                         batches_per_step=1, seed=seed)
        coefficients, final_rows = res.coefficients, res.rows
    else:
        coefficients = torch.full((n_rows, k_tasks), init)
        final_rows = rows
    merged = {n: t.clone() for n, t in base.items()}
    for n in names:
        row = coefficients[final_rows[n]]
        t = theta0[n] + sum(float(row[k]) * masks[n] * tvs[k][n] for k in range(k_tasks))
        merged[n] = t.to(base[n].dtype)
    return DamResult(masks=masks, coefficients=coefficients, merged=merged, history=history)
