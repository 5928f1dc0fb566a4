"""The distillation objective and the teacher-fusion rules.

For student logits z_s at a position with fused teacher target p (temperature T)::

    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v),     q = softmax(z_s / T)      (× T², Hinton et al.)
    L = λ · CE(gold, softmax(z_s)) + (1 − λ) · KL(p ‖ q)  [+ β · ‖h_s − h̄_T‖² / d]

averaged over the positions that have a gold token (CE) and a target (KL); the optional
feature term (β > 0) matches the student's last hidden state h_s to the teachers' h̄_T, fused
with the same weights, at the target positions (teachers of the student's width only).

Fusion of K teachers on one example (FuseLLM's rules, which "Unconstrained Model Merging"
builds on), with CE_k the teacher's cross-entropy on the example's gold tokens::

    min_ce:      p = p_{k*},  k* = argmin_k CE_k
    inverse_ce:  p = Σ_k w_k p_k,  w_k = CE_k⁻¹ / Σ_j CE_j⁻¹
    mean:        p = (1/K) Σ_k p_k
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from modelalloy.distill.errors import DistillError

FUSIONS = ("min_ce", "inverse_ce", "mean")


def kl_to_target(target: torch.Tensor, student_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(target ‖ softmax(student_logits / T)) · T²."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = target.float()
    logp = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    return (p * (logp - logq)).sum(-1).mean() * temperature ** 2


def fusion_weights(ces: Sequence[float], rule: str) -> list[float]:
    """Per-teacher weights of ``rule`` from their cross-entropies (inf = teacher has none)."""
    if rule not in FUSIONS:
        raise DistillError(f"distill: fusion must be one of {', '.join(FUSIONS)}, got '{rule}'")
    finite = [c for c in ces if c < float("inf")]
    if not finite:
        return [0.0] * len(ces)
    if rule == "min_ce":
        best = min(range(len(ces)), key=lambda k: ces[k])
        return [1.0 if k == best else 0.0 for k in range(len(ces))]
    if rule == "mean":
        return [1.0 / len(finite) if c < float("inf") else 0.0 for c in ces]
    inv = [1.0 / max(c, 1e-8) if c < float("inf") else 0.0 for c in ces]
    total = sum(inv)
    return [v / total for v in inv]


def distill_loss(student_logits: torch.Tensor, gold: torch.Tensor, gold_pos: torch.Tensor,
                 kl_pos: torch.Tensor, target: torch.Tensor, lam: float,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, CE, KL) for one sequence: logits (T, V); ``gold[i]`` is the token after position i
    for the positions ``gold_pos``; ``target`` (n, V) the fused distributions at ``kl_pos``."""
    zero = student_logits.sum() * 0
    ce = F.cross_entropy(student_logits[gold_pos].float(), gold) if len(gold_pos) else zero
    kl = kl_to_target(target, student_logits[kl_pos], temperature) if len(kl_pos) else zero
    return lam * ce + (1 - lam) * kl, ce, kl


def feature_loss(student_hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ‖h_s − h̄_T‖² / d (the mean squared error)."""
    return F.mse_loss(student_hidden.float(), target.float())
