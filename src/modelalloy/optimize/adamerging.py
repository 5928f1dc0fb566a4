"""AdaMerging — Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
ICLR 2024 (reference: EnnengYang/AdaMerging, ``main_task_wise_adamerging.py``,
``main_layer_wise_adamerging.py``, ``..._adamergingpp.py``).

Learns task-arithmetic coefficients by minimising the Shannon entropy of the merged model's
predictions on **unlabelled** test batches of every task::

    task-wise:   θ(λ) = θ₀ + Σ_k λ_k τ_k                    λ ∈ ℝ^K
    layer-wise:  θ^l(λ) = θ₀^l + Σ_k λ_{l,k} τ_k^l          λ ∈ ℝ^{L×K}, one row per tensor
    loss = Σ_k mean_{x ∈ B_k} H(softmax(head_k(f_θ(λ)(x))))      H(p) = −Σ_c p_c log p_c

The coefficients used in the forward pass are clamp(λ_raw, 0, 1) (the official code; gradients
are zero outside the range), initialised at 0.3 and trained with Adam (lr 1e-3, betas 0.9/0.999,
no weight decay) for 500 steps, two batches per task per step. AdaMerging++ (``ties_density``,
reference 0.2) first turns each τ_k into its TIES-trimmed, sign-elected version.

Every named floating parameter of the module that is in the base state dict is merged (the
reference merges every encoder tensor, LayerNorms and biases included); ``exclude`` is a regex
of names to keep at θ₀. For sequence outputs (batch, tokens, vocab) the entropy is averaged
over the unmasked positions. The result is a set of coefficients, written as a
``task_arithmetic`` recipe: the final weights always come out of the engine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelalloy.optimize.functional import TaskVectorModel, ties_split
from modelalloy.stats.hooks import logits_of, progress, split_batch, to_device, token_mask


def entropy_of_logits(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over all leading positions (mask-aware)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    if mask is not None and tuple(mask.shape) == tuple(h.shape):
        m = mask.to(h.dtype)
        return (h * m).sum() / m.sum().clamp_min(1.0)
    return h.mean()


@dataclass
class CoefficientResult:
    """Learned task-arithmetic coefficients: ``coefficients[row, k]`` for expert k.

    ``names[i]`` are the tensors merged; ``rows[name]`` their coefficient row (all 0 for
    task-wise). ``history`` is the loss per step (before the step).
    """

    method: str
    granularity: str
    coefficients: torch.Tensor
    names: list[str]
    rows: dict[str, int]
    history: list[float] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    all_names: list[str] = field(default_factory=list)  # every tensor of the base state dict

    def weight_of(self, name: str, k: int) -> float:
        return float(self.coefficients[self.rows[name], k])

    def to_recipe(self, base_model: str, models: Sequence[str]) -> dict[str, Any]:
        """A ``task_arithmetic`` recipe (mergekit format) reproducing the merge.

        Task-wise: one scalar ``weight`` per model. Layer-wise: per model a conditional list of
        ``{filter: <full tensor name>, value: c}``. mergekit filters match by *substring*, first
        match wins, so entries go longest name first, and a tensor left at the base whose name
        contains a merged tensor's name (``10.weight`` contains ``0.weight``) gets its own
        ``value: 0`` entry; the final ``{value: 0.0}`` keeps the other unmerged tensors at
        the base. ``normalize: false``, ``lambda: 1`` (θ = θ₀ + Σ_k c_k τ_k).
        """
        if len(models) != self.coefficients.shape[1]:
            raise ValueError(f"{len(models)} model paths for {self.coefficients.shape[1]} "
                             "coefficient columns")
        merged = set(self.names)
        shadowed = [n for n in self.all_names if n not in merged
                    and any(m in n for m in merged)]
        entries = []
        for k, path in enumerate(models):
            if self.granularity == "task" and not shadowed and len(merged) == len(
                    self.all_names or self.names):
                weight: Any = round(float(self.coefficients[0, k]), 6)
            else:
                pairs = [(n, round(self.weight_of(n, k), 6)) for n in self.names]
                pairs += [(n, 0.0) for n in shadowed]
                pairs.sort(key=lambda nv: -len(nv[0]))
                weight = [{"filter": n, "value": v} for n, v in pairs] + [{"value": 0.0}]
            entries.append({"model": str(path), "parameters": {"weight": weight}})
        final = f", final entropy {self.history[-1]:.4g}" if self.history else ""
        return {"name": f"{self.method} ({self.granularity}-wise{final})",
                "merge_method": "task_arithmetic", "base_model": str(base_model),
                "models": entries, "parameters": {"normalize": False, "lambda": 1.0},
                "dtype": "float32"}

    def save_recipe(self, path: str | Path, base_model: str, models: Sequence[str]) -> Path:
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_recipe(base_model, models), sort_keys=False))
        return path

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"method": self.method, "granularity": self.granularity,
                                    "rows": self.row_labels,
                                    "coefficients": self.coefficients.tolist(),
                                    "history": self.history}, indent=1))
        return path

    def save_heatmap(self, path: str | Path, model_labels: Sequence[str] | None = None) -> Path:
        """A PNG heatmap of the coefficients (rows: tensors or the single task-wise row)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        c = self.coefficients.detach().cpu().numpy()
        rows, cols = c.shape
        fig, ax = plt.subplots(figsize=(2 + 0.8 * cols, 1.5 + 0.18 * rows))
        im = ax.imshow(c, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(cols))
        ax.set_xticklabels(model_labels or [f"model {k}" for k in range(cols)], rotation=45,
                           ha="right", fontsize=7)
        labels = self.row_labels or [str(i) for i in range(rows)]
        if rows <= 80:
            ax.set_yticks(range(rows))
            ax.set_yticklabels(labels, fontsize=5)
        ax.set_title(f"{self.method} ({self.granularity}-wise) coefficients", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _cycle(batches: Sequence[Any], rng: random.Random) -> Iterator[Any]:
    """Shuffled passes over a task's batches, forever (sampling across steps)."""
    order = list(range(len(batches)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield batches[i]


def adamerging(model: nn.Module, base: Mapping[str, torch.Tensor],
               experts: Sequence[Mapping[str, torch.Tensor]], task_batches: Sequence[Sequence[Any]],
               *, granularity: str = "layer", steps: int = 500, lr: float = 1e-3,
               init: float = 0.3, clamp: tuple[float, float] | None = (0.0, 1.0),
               batches_per_step: int = 2,
               heads: Sequence[Callable[[Any], torch.Tensor]] | None = None,
               ties_density: float | None = None, exclude: str | None = None, seed: int = 0,
               device: str | torch.device | None = None,
               show_progress: bool = False) -> CoefficientResult:
    """Learn AdaMerging coefficients (see the module docstring for the objective).

    ``model`` is any module with the merged architecture (its parameters are left untouched);
    ``task_batches[k]`` are unlabelled batches of task k (a dict, tuple or tensor each; a
    ``labels`` key is ignored); ``heads[k]`` maps the model output to task k's logits (default:
    the output's logits). Defaults are the paper's: layer-wise, 500 steps, Adam lr 1e-3,
    init 0.3, clamp to [0, 1], 2 batches per task per step.
    """
    if granularity not in ("task", "layer"):
        raise ValueError("granularity must be 'task' or 'layer'")
    if len(task_batches) != len(experts):
        raise ValueError("give one sequence of unlabelled batches per expert (task)")
    tvm = TaskVectorModel(model, base, experts, exclude=exclude, device=device)
    if ties_density is not None:
        tvm.tvs = ties_split(tvm.tvs, ties_density)
    k_tasks = len(experts)
    if granularity == "task":
        rows = {n: 0 for n in tvm.names}
        labels = ["all tensors"]
    else:
        rows = {n: i for i, n in enumerate(tvm.names)}
        labels = list(tvm.names)
    raw = torch.full((len(labels), k_tasks), float(init), device=tvm.device, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    rng = random.Random(seed)
    streams = [_cycle(list(b), rng) for b in task_batches]
    get_logits = list(heads) if heads is not None else [logits_of] * k_tasks
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    history: list[float] = []

    def coeffs() -> torch.Tensor:
        return raw.clamp(*clamp) if clamp is not None else raw

    try:
        for _ in progress(range(steps), show_progress, "adamerging", total=steps):
            loss = torch.zeros((), device=tvm.device)
            c = coeffs()
            for k in range(k_tasks):
                for _b in range(batches_per_step):
                    inputs, _ = split_batch(next(streams[k]))
                    inputs = to_device(inputs, tvm.device)
                    out = tvm.forward(c, rows, inputs)
                    loss = loss + entropy_of_logits(get_logits[k](out), token_mask(inputs))
            history.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    final = coeffs().detach().cpu()
    name = "adamerging++" if ties_density is not None else "adamerging"
    return CoefficientResult(name, granularity, final, list(tvm.names), rows, history, labels,
                             list(base.keys()))


def mean_entropy(model: nn.Module, base: Mapping[str, torch.Tensor],
                 experts: Sequence[Mapping[str, torch.Tensor]], result: CoefficientResult,
                 task_batches: Sequence[Sequence[Any]],
                 heads: Sequence[Callable[[Any], torch.Tensor]] | None = None) -> float:
    """Σ_k mean entropy over all of task k's batches at the learned coefficients."""
    tvm = TaskVectorModel(model, base, experts)
    get_logits = list(heads) if heads is not None else [logits_of] * len(experts)
    rows = {n: result.rows.get(n, 0) for n in tvm.names}
    coeffs = result.coefficients.to(tvm.device)
    if any(n not in result.rows for n in tvm.names):  # tensors left at the base
        coeffs = torch.cat([coeffs, torch.zeros(1, coeffs.shape[1])])
        rows = {n: result.rows.get(n, coeffs.shape[0] - 1) for n in tvm.names}
    total = 0.0
    with torch.no_grad():
        for k, batches in enumerate(task_batches):
            vals = []
            for batch in batches:
                inputs, _ = split_batch(batch)
                inputs = to_device(inputs, tvm.device)
                vals.append(float(entropy_of_logits(
                    get_logits[k](tvm.forward(coeffs, rows, inputs)), token_mask(inputs))))
            total += sum(vals) / max(len(vals), 1)
    return total
