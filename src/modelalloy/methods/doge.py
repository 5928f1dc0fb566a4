"""DOGE — Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent
(Wei et al., ICML 2025, arXiv 2501.01230).

Official implementation: FusionBench ``fusion_bench/method/doge_ta/doge_ta.py``
(``DOGE_TA_Algorithm``; the authors' ``WalkerWorldPeace/DOGE`` is built on it). Spec:
datainformed.md §11. Data-free.

For each selected 2-D weight (d_out × d_in), tasks k = 1..K, τ_k = θ_k − θ_0:

- task-aware coefficients λ_k = λ / ‖τ_k‖_F (per tensor), λ = 0.07;
- a shared modification δ (init 0), merged update m = Σ_k λ_k τ_k + (Σ_k λ_k) δ;
- loss L(δ) = Σ_j Σ_rows ⟨τ_j[r, :], τ_j[r, :] − m[r, :]⟩²  (first-order loss gap with the task
  vector as a proxy for the negative gradient);
- shared subspace: the top ⌊r/K⌋ left singular vectors of every τ_k side by side (r columns),
  whose own top ⌊r/subspace⌋ left singular vectors U_s span the shared output subspace;
- 400 Adam steps (lr 1e-4, PyTorch defaults) on δ, each gradient projected out of the shared
  subspace: g ← g − U_s(U_sᵀ g);
- masks M_k: top ``density`` (K = 30%) of |τ_k| over all selected tensors of the model;
- θ = θ_0 + Σ_k λ_k (τ_k + δ) ⊙ M_k. Unselected tensors (embeddings, norms, biases) stay at
  θ_0, as in the official code.

The gradient is the closed form ∂L/∂δ = −2(Σ_k λ_k) Σ_j diag(a_j) τ_j with
a_j[r] = ⟨τ_j[r], τ_j[r] − m[r]⟩, and Adam is written out (identical to ``torch.optim.Adam``),
so no autograd is needed inside the engine. The official code keeps one Adam over all
layers, but Adam's state is per parameter, so a fresh optimiser per tensor is the same.

Needs beyond one tensor: the whole-model top-k mask thresholds (``prepare``, global scope).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from modelalloy.methods._sparsify import global_thresholds
from modelalloy.methods._taskvec import (
    SCOPES,
    GroupsFactory,
    TensorGroup,
    check_scope,
    iter_groups,
    kth_largest_abs,
    need_base,
    stack_task_vectors,
)
from modelalloy.methods.registry import Execution, MergeContext, Param, Prepare, register_method


def selected(name: str, t: torch.Tensor, layer_index: int | None, include: str) -> bool:
    """Which tensors DOGE optimises: 2-D weights inside the block stack (not norms), or those
    whose name matches ``include`` (official CLIP rule: "encoder", "weight", no "layer_norm")."""
    if t.dim() != 2 or "norm" in name:
        return False
    if include:
        return re.search(include, name) is not None
    return layer_index is not None and name.endswith("weight")


def shared_subspace(tvs: torch.Tensor, divisor: float) -> torch.Tensor:
    """U_s (d_out × ⌊r/divisor⌋): the shared output subspace of the task matrices."""
    n, m, cols = tvs.shape
    r = min(m, cols)
    k = r // n
    u_cat = tvs.new_zeros(m, r)
    for t in range(n):
        if k == 0:
            break
        u, _, _ = torch.linalg.svd(tvs[t], full_matrices=False)
        u_cat[:, t * k:(t + 1) * k] = u[:, :k]
    uu, _, _ = torch.linalg.svd(u_cat, full_matrices=False)
    return uu[:, :int(r / divisor)]


def doge_loss_grad(tvs: torch.Tensor, lams: torch.Tensor,
                   delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(δ), ∂L/∂δ) for one tensor."""
    m = (lams.view(-1, 1, 1) * tvs).sum(dim=0) + lams.sum() * delta
    a = (tvs * (tvs - m.unsqueeze(0))).sum(dim=2)  # (K, rows)
    loss = (a ** 2).sum()
    grad = -2.0 * lams.sum() * (a.unsqueeze(2) * tvs).sum(dim=0)
    return loss, grad


def optimize_delta(tvs: torch.Tensor, lams: torch.Tensor, basis: torch.Tensor, steps: int,
                   lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.Tensor:
    """Adam on δ with projected gradients (PyTorch Adam, no weight decay, no amsgrad)."""
    delta = torch.zeros_like(tvs[0])
    m1 = torch.zeros_like(delta)
    m2 = torch.zeros_like(delta)
    b1, b2 = betas
    for step in range(1, steps + 1):
        _, grad = doge_loss_grad(tvs, lams, delta)
        if basis.numel():
            grad = grad - basis @ (basis.T @ grad)
        m1.mul_(b1).add_(grad, alpha=1 - b1)
        m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (m2 / (1 - b2 ** step)).sqrt().add_(eps)
        delta.addcdiv_(m1, denom, value=-lr / (1 - b1 ** step))
    return delta


def _select_group(g: TensorGroup) -> bool:
    return selected(g.name, g.experts[0], g.ctx.layer_index, g.params["include"])


def _prepare(groups: GroupsFactory) -> list[float | None] | None:
    first = next(iter(groups()), None)
    if first is None:
        return None
    check_scope(first.params["scope"])
    if first.params["scope"] != "global":
        return None
    if next(iter_groups(groups, _select_group), None) is None:
        return None
    # The official topk_values_mask rule over all selected tensors, in bounded memory.
    stats = global_thresholds(lambda: iter_groups(groups, _select_group),
                              [first.params["density"]] * len(first.experts))
    return list(stats["thresholds"])


@register_method(
    name="doge",
    params=[
        Param("lamda", float, 0.07, "λ of the task-aware coefficients λ_k = λ/‖τ_k‖_F"),
        Param("subspace", float, 6.0, "shared subspace size divisor: ⌊r/subspace⌋ directions",
              gt=0.0),
        Param("density", float, 0.3, "fraction of each task vector kept by the final top-k "
              "mask (official K = 30)", gt=0.0, le=1.0),
        Param("steps", int, 400, "Adam steps per tensor", ge=0),
        Param("lr", float, 1e-4, "Adam learning rate", gt=0.0),
        Param("include", str, "", "regex of the tensors to optimise (default: 2-D weights "
              "inside the block stack, norms excluded); the rest stay at the base"),
        Param("scope", str, "global", "top-k mask threshold over all selected tensors "
              "(official) or per tensor", choices=SCOPES),
    ],
    paper="Wei et al., Modeling Multi-Task Model Merging as Adaptive Projective Gradient "
          "Descent, ICML 2025 (arXiv 2501.01230)",
    summary="Data-free optimisation of a shared modification of the task vectors, with "
            "gradients projected out of the tasks' shared subspace and task-aware coefficients",
    base="required",
    execution=Execution(prepare=Prepare(_prepare)),
    uniform=("density", "scope", "include"),
    aliases=("doge_ta",),
)
def doge(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
         ctx: MergeContext) -> torch.Tensor:
    """θ = θ_0 + Σ_k λ_k (τ_k + δ*) ⊙ M_k on selected 2-D weights; θ_0 elsewhere.

    Needs beyond one tensor: the layer index (default selection) and whole-model mask
    thresholds (``prepare``). Defaults: λ = 0.07, subspace 6, K = 30%, 400 Adam steps, lr 1e-4.
    """
    base = need_base(base, "doge", ctx.name)
    if not selected(ctx.name, base, ctx.layer_index, params["include"]):
        return base.clone()
    tvs = stack_task_vectors(base, experts)
    norms = tvs.flatten(1).norm(dim=1)
    lams = torch.where(norms > 0, params["lamda"] / torch.where(norms > 0, norms, 1.0),
                       torch.zeros_like(norms))
    basis = shared_subspace(tvs, params["subspace"])
    delta = optimize_delta(tvs, lams, basis, params["steps"], params["lr"])
    thresholds = ctx.global_stats
    if thresholds is None:
        thresholds = [kth_largest_abs(tvs[t], params["density"]) for t in range(len(experts))]
    out = base.clone()
    for t in range(len(experts)):
        thr = thresholds[t]
        mask = torch.ones_like(base) if thr is None else (tvs[t].abs() >= thr).to(base.dtype)
        out = out + lams[t] * (tvs[t] + delta) * mask
    return out
