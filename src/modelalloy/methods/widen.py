"""WIDEN — weight disentanglement (Yu et al., 2024, "Extend Model Merging from Fine-Tuned to
Pre-Trained Large Language Models via Weight Disentanglement", arXiv 2408.03092).

Official code ``yule-BUAA/MergeLLM`` (``model_merging_methods/merging_methods.py::
widen_merging``). Spec: datafree.md §11.

For a 2-D weight W (out, in) — token embeddings are transposed to (hidden, vocab) first, so
columns are tokens — and models i = 1..N with deltas Δ_i = W_i − W_0:

1. Per column j: magnitude m(W)_j = ‖W[:, j]‖₂ and direction D(W)[:, j] = W[:, j]/m(W)_j.
2. ΔM_i = |m(W_i) − m(W_0)|,  ΔD_i = 1 − cos(D(W_i)[:, j], D(W_0)[:, j]).
3. Rank within each model, separately for ΔM and ΔD: stable ascending argsort over the
   columns; the column at sorted position p gets significance p/in ∈ [0, 1).
4. Scores of a significance matrix S ∈ R^{N×in}: softmax over the models, then s_cal wherever
   S_i,j > t_avg · mean_j(S_i).
5. w = ½(score(ΔM ranks) + score(ΔD ranks));  W = W_0 + Σ_i Δ_i[:, j] · w_i,j.

1-D tensors (norms, biases) and any other non-2-D tensor: S = |Δ_i| unranked, w = score(S),
θ = θ_0 + Σ_i w_i ⊙ Δ_i.

Ranks make the weights independent of how large each model's deltas are, which is what lets a
continually pre-trained model (large deltas) merge with a fine-tuned one (small deltas): no
model's weight leaves [softmax floor, s_cal]. Per tensor; nothing beyond one tensor is needed.
Zero-norm columns (padding rows of an embedding) get ΔD = 0 (the spec's guard; the official
code's 1e-8 gives ΔD = 1 there).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from modelalloy.methods._taskvec import need_base, stack_task_vectors
from modelalloy.methods.registry import MergeContext, Param, register_method

EMBEDDING_PATTERN = r"(embed_tokens|word_embeddings|wte|embed_in|shared)\.weight$"


def rank_significance(diff: torch.Tensor) -> torch.Tensor:
    """(N, in) differences -> (N, in) significance p/in by stable ascending rank per model."""
    n_cols = diff.shape[1]
    order = torch.argsort(diff, dim=1, descending=False, stable=True)
    levels = (torch.arange(n_cols, dtype=diff.dtype, device=diff.device) / n_cols)
    out = torch.empty_like(diff)
    out.scatter_(1, order, levels.expand_as(diff).contiguous())
    return out


def importance_scores(sig: torch.Tensor, t_avg: float, s_cal: float) -> torch.Tensor:
    """Softmax over models, calibrated to s_cal where sig > t_avg · (the model's mean sig)."""
    scores = torch.softmax(sig, dim=0)
    flagged = sig > t_avg * sig.mean(dim=1, keepdim=True)
    return torch.where(flagged, torch.full_like(scores, s_cal), scores)


def widen_weights(base: torch.Tensor, deltas: torch.Tensor, t_avg: float = 1.0,
                  s_cal: float = 1.0) -> torch.Tensor:
    """Per-(model, column) merge weights w (N, in) of a 2-D weight (out, in)."""
    models = base.unsqueeze(0) + deltas
    mag0 = base.norm(dim=0)
    mags = models.norm(dim=1)  # (N, in)
    d_mag = (mags - mag0).abs()
    dots = (models * base.unsqueeze(0)).sum(dim=1)
    denom = mags * mag0
    cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0),
                      torch.ones_like(dots))
    d_dir = 1.0 - cos
    w_mag = importance_scores(rank_significance(d_mag), t_avg, s_cal)
    w_dir = importance_scores(rank_significance(d_dir), t_avg, s_cal)
    return 0.5 * (w_mag + w_dir)


@register_method(
    name="widen",
    # s_cal is the weight each model's above-average columns get (1, its README value for two
    # or three models, adds them like task arithmetic with λ = 1; tiny-vision's 8 experts: 64.0
    # at 1 against 80.2 at 0.3, docs/benchmarks.md), so the bench chooses it like λ
    scale="score_calibration",
    params=[
        Param("above_average_ratio", float, 1.0, "t_avg: a column whose significance exceeds "
              "t_avg × the model's mean significance gets the calibrated score", ge=0.0),
        Param("score_calibration", float, 1.0, "s_cal: the score of above-average columns "
              "(a column flagged in every model is added like task arithmetic with λ = s_cal)"),
        Param("embedding_pattern", str, EMBEDDING_PATTERN, "regex of token-embedding tensors, "
              "transposed so that each token is a column"),
    ],
    paper="Yu et al., Extend Model Merging from Fine-Tuned to Pre-Trained Large Language "
          "Models via Weight Disentanglement, 2024 (arXiv 2408.03092)",
    summary="Per-column magnitude/direction changes ranked within each model give merge "
            "weights; merges continually pre-trained with fine-tuned models",
    base="required",
)
def widen(base: torch.Tensor | None, experts: list[torch.Tensor], params: dict[str, Any],
          ctx: MergeContext) -> torch.Tensor:
    """W = W_0 + Σ_i Δ_i · w_i (per column for 2-D, per entry otherwise).

    Per tensor. Defaults: t_avg = 1, s_cal = 1 (the README settings for Sailor + Qwen-Chat and
    for WizardLM/Math/Code).
    """
    base = need_base(base, "widen", ctx.name)
    deltas = stack_task_vectors(base, experts)
    t_avg, s_cal = params["above_average_ratio"], params["score_calibration"]
    if base.dim() != 2:
        flat = deltas.reshape(len(experts), -1)
        w = importance_scores(flat.abs(), t_avg, s_cal)
        return base + (w * flat).sum(dim=0).reshape(base.shape)
    transpose = bool(params["embedding_pattern"]) and re.search(params["embedding_pattern"],
                                                                 ctx.name) is not None
    b = base.T if transpose else base
    d = deltas.transpose(1, 2) if transpose else deltas
    w = widen_weights(b, d, t_avg, s_cal)
    merged = b + (d * w.unsqueeze(1)).sum(dim=0)
    return merged.T.contiguous() if transpose else merged
