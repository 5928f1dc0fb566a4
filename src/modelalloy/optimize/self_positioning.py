"""Self Positioning — Li et al., "Improving General Text Embedding Model: Tackling Task Conflict
and Data Imbalance through Model Merging", arXiv 2410.15035 (no official code; spec:
uncertain-resolved.md §2, with a third-party implementation `izhx/vibe_emb` for the optimiser).

Searches the interpolation space of task vectors v_i = θ_i − θ₀ by gradient descent on a probe
set, with N + 1 trainable scalars::

    V_1 = v_1;  V_i = SLERP(V_{i−1}, v_i; t_i),  t_i = a_i / (ā_{<i} + a_i),
    ā_{<i} = mean(a_1..a_{i−1})
    SLERP(x, y; t) = sin((1−t)Ω)/sin Ω · x + sin(tΩ)/sin Ω · y,  Ω = ∠(x, y)   (raw vectors;
                     (1−t)x + t·y when |cos Ω| > 1 − 1e-6)
    θ(a, λ) = θ₀ + λ·V_N;     min_{a, λ} mean_{batches} L(θ(a, λ)) + μ·λ

Ω is global (over all merged tensors flattened together, the third-party default). Because every
V_i is a linear combination of the v's, V_N = Σ_i w_i v_i: the angles come from the N×N Gram
matrix of the task vectors (computed once), and the result is exactly a ``task_arithmetic``
recipe with weights λ·w_i.

Defaults `[UNVERIFIED against the paper]`: a = softplus(raw), λ = softplus(raw), both
initialised at 1; Adam lr 5e-3; 1000 steps; μ = 0.05 (paper sweep {0, 0.05, 0.1}). The loss is
the user's: ``loss_fn(forward, batch) -> scalar`` where ``forward(inputs)`` runs the merged model
(for embedding models, an InfoNCE over (query, positive, negatives) — :func:`info_nce`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelalloy.optimize.adamerging import CoefficientResult
from modelalloy.optimize.functional import TaskVectorModel
from modelalloy.stats.hooks import progress, to_device


def slerp_weights(a: torch.Tensor, gram: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """w such that V_N = Σ_i w_i v_i for the iterative SLERP with weights a, given
    gram[i, j] = ⟨v_i, v_j⟩. Differentiable in a."""
    n = a.shape[0]
    w = torch.zeros(n, dtype=gram.dtype, device=gram.device)
    w[0] = 1.0
    for i in range(1, n):
        t = a[i] / (a[:i].mean() + a[i])
        e = torch.zeros(n, dtype=gram.dtype, device=gram.device)
        e[i] = 1.0
        dot = w @ gram[:, i]
        nx = torch.sqrt((w @ gram @ w).clamp_min(1e-30))
        ny = torch.sqrt(gram[i, i].clamp_min(1e-30))
        cos = (dot / (nx * ny)).clamp(-1.0, 1.0)
        if float(cos.detach().abs()) > 1 - eps:
            w = (1 - t) * w + t * e
        else:
            omega = torch.arccos(cos)
            s = torch.sin(omega)
            w = torch.sin((1 - t) * omega) / s * w + torch.sin(t * omega) / s * e
    return w


def info_nce(queries: torch.Tensor, docs: torch.Tensor, temperature: float = 0.02,
             group_size: int = 4) -> torch.Tensor:
    """In-batch InfoNCE with hard negatives: ``docs`` holds ``group_size`` documents per query
    (the first is the positive); embeddings are L2-normalised."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    d = torch.nn.functional.normalize(docs.float(), dim=-1)
    scores = q @ d.T / temperature
    target = torch.arange(q.shape[0], device=q.device) * group_size
    return torch.nn.functional.cross_entropy(scores, target)


def self_positioning(model: nn.Module, base: Mapping[str, torch.Tensor],
                     experts: Sequence[Mapping[str, torch.Tensor]], probe: Sequence[Any],
                     loss_fn: Callable[[Callable[[Any], Any], Any], torch.Tensor], *,
                     steps: int = 1000, lr: float = 5e-3, mu: float = 0.05,
                     init_a: float = 1.0, init_lambda: float = 1.0, exclude: str | None = None,
                     seed: int = 0, device: str | torch.device | None = None,
                     show_progress: bool = False) -> CoefficientResult:
    """Learn the Self Positioning point; returns task-wise coefficients λ·w (a recipe)."""
    tvm = TaskVectorModel(model, base, experts, exclude=exclude, device=device)
    n = tvm.num_tasks
    flat = [torch.cat([tv[name].flatten() for name in tvm.names]).double() for tv in tvm.tvs]
    gram = torch.stack([torch.stack([x @ y for y in flat]) for x in flat])
    del flat

    def inv_softplus(v: float) -> float:
        return v + math.log(-math.expm1(-v))

    raw_a = torch.full((n,), inv_softplus(init_a), dtype=torch.float64, requires_grad=True)
    raw_l = torch.tensor(inv_softplus(init_lambda), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([raw_a, raw_l], lr=lr)
    rows = {name: 0 for name in tvm.names}
    rng = random.Random(seed)
    order = list(range(len(probe)))
    history: list[float] = []
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    def coeffs() -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.nn.functional.softplus(raw_a)
        lam = torch.nn.functional.softplus(raw_l)
        return (lam * slerp_weights(a, gram)).float(), lam

    try:
        pos = len(order)
        for _ in progress(range(steps), show_progress, "self positioning", total=steps):
            if pos >= len(order):
                rng.shuffle(order)
                pos = 0
            batch = to_device(probe[order[pos]], tvm.device)
            pos += 1
            c, lam = coeffs()
            row = c.to(tvm.device)[None, :]
            loss = loss_fn(lambda inputs, row=row: tvm.forward(row, rows, inputs), batch)
            total = loss + mu * lam.float()
            history.append(float(total.detach()))
            opt.zero_grad()
            total.backward()
            opt.step()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    final = coeffs()[0].detach().cpu()[None, :]
    return CoefficientResult("self_positioning", "task", final, list(tvm.names), rows, history,
                             ["all tensors"], list(base.keys()))
