"""OptMerge (WUDI v2) — "Unifying Multimodal Large Language Model Capabilities and Modalities
via Model Merging" (Wei et al., ICLR 2026).

Official code ``WalkerWorldPeace/MLLMerging`` (``LLaMA-Factory/model_merging.py::
wudi_merging2``; the README calls the paper's method OptMerge). Spec: datainformed.md §15.
Data-free.

For every selected 2-D weight (m, n), K tasks, r = ⌊min(m, n)/K⌋:

- denoised task vectors τ̃_k = U_r S_r V_rᵀ (rank-r truncation of τ_k) and low-rank factors
  B_k = V_r S_r (n × r);
- loss(M) = Σ_k ‖(M − τ̃_k) B_k‖_F² / ‖τ_k‖_F²  (interference measured along each task's
  dominant input directions, weighted by their singular values; the code's
  (M − τ̃_k)(S V_rᵀ)ᵀ with zero padding is the same number);
- M starts at the mean task vector; 300 steps of SGD (lr 1e-4, momentum 0.9, PyTorch's rule);
- θ = θ_0 + λ·M, λ = 1 (LLaMA-Factory script; the InternVL script uses 0.1).

Tensors matching ``exclude`` (official: vision tower, token embeddings, lm_head, norms, biases)
stay at θ_0; other non-2-D tensors get θ_0 + λ·mean_k τ_k. The gradient is the closed form
2 Σ_k (M − τ̃_k) B_k B_kᵀ / ‖τ_k‖², and SGD is written out, so no autograd is needed. The
reference runs in fp16; here everything is fp32 (the spec's recommendation).

Per tensor: nothing beyond one tensor is needed.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from modelalloy.methods._taskvec import need_base, stack_task_vectors
from modelalloy.methods.registry import MergeContext, Param, register_method

EXCLUDE = r"^(visual\.|vision_tower\.|model\.visual\.)|embed_tokens|lm_head|norm|bias"


def denoise(tvs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ̃_k, B_k) for every task: rank-⌊min(m,n)/K⌋ truncation and V_r S_r."""
    n_tasks = tvs.shape[0]
    r = min(tvs.shape[1:]) // n_tasks
    low, factors = [], []
    for k in range(n_tasks):
        u, s, vh = torch.linalg.svd(tvs[k], full_matrices=False)
        low.append(u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
        factors.append(vh[:r].T * s[:r])
    return torch.stack(low), torch.stack(factors)


def optmerge_matrix(tvs: torch.Tensor, steps: int, lr: float, momentum: float) -> torch.Tensor:
    low, factors = denoise(tvs)
    sq = tvs.flatten(1).pow(2).sum(dim=1)
    weights = torch.where(sq > 0, 1.0 / torch.where(sq > 0, sq, 1.0), torch.zeros_like(sq))
    merged = tvs.mean(dim=0)
    buf: torch.Tensor | None = None
    for _ in range(steps):
        diff = merged.unsqueeze(0) - low  # (K, m, n)
        proj = torch.bmm(diff, factors)  # (K, m, r)
        grad = 2.0 * (weights.view(-1, 1, 1) * torch.bmm(proj, factors.transpose(1, 2))).sum(0)
        buf = grad.clone() if buf is None else buf.mul_(momentum).add_(grad)
        merged = merged - lr * buf
    return merged


@register_method(
    name="optmerge",
    params=[
        Param("lambda", float, 1.0, "λ: θ = θ_0 + λ·M (1.0 LLaMA-Factory script, 0.1 "
              "InternVL script)"),
        Param("steps", int, 300, "SGD iterations per tensor", ge=0),
        Param("lr", float, 1e-4, "SGD learning rate", gt=0.0),
        Param("momentum", float, 0.9, "SGD momentum", ge=0.0, lt=1.0),
        Param("exclude", str, EXCLUDE, "regex of tensors left at the base (official: vision "
              "tower, embed_tokens, lm_head, norms, biases)"),
    ],
    paper="Wei et al., Unifying Multimodal Large Language Model Capabilities and Modalities "
          "via Model Merging, ICLR 2026 (code: WalkerWorldPeace/MLLMerging, wudi_merging2)",
    summary="Data-free optimisation of the merged task vector against low-rank denoised task "
            "vectors, measuring interference along each task's dominant input directions",
    base="required",
    aliases=("wudi2",),
)
def optmerge(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
             ctx: MergeContext) -> torch.Tensor:
    """θ = θ_0 + λ·argmin_M Σ_k ‖(M − τ̃_k) V_r S_r‖²/‖τ_k‖² (300 SGD steps from the mean).

    Per tensor. Defaults: λ = 1, 300 steps, lr 1e-4, momentum 0.9.
    """
    base = need_base(base, "optmerge", ctx.name)
    if params["exclude"] and re.search(params["exclude"], ctx.name):
        return base.clone()
    tvs = stack_task_vectors(base, experts)
    if base.dim() != 2:
        return base + params["lambda"] * tvs.mean(dim=0)
    merged = optmerge_matrix(tvs, params["steps"], params["lr"], params["momentum"])
    return base + params["lambda"] * merged
