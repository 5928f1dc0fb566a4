"""A tiny model family whose best merge is known: objectives for the optimizer tests.

Base θ₀ and experts θ_k = θ₀ + τ_k are drawn from fixed seeds (a 3-layer MLP state dict:
``layers.{0,1,2}.weight``/``.bias`` and a ``head.weight`` outside the stack). The objective
``quadratic`` is −mean over tensors of mean((θ − θ*)²) with θ* = θ₀ + Σ_k c*_{l,k} τ_k: with the
task vectors drawn independently its maximum (0) is at the task-arithmetic weights c*, worked
out here by construction, not by any optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {"layers.0.weight": (6, 4), "layers.0.bias": (6,), "layers.1.weight": (6, 6),
          "layers.1.bias": (6,), "layers.2.weight": (5, 6), "layers.2.bias": (5,),
          "head.weight": (3, 5), "step": ()}
# the best task-arithmetic weight of each expert, per layer (head: the "other" cell)
TARGET = {"layers.0": (0.3, 0.7), "layers.1": (0.3, 0.7), "layers.2": (0.3, 0.7),
          "head": (0.3, 0.7)}
LAYER_TARGET = {"layers.0": (0.2, 0.8), "layers.1": (0.5, 0.5), "layers.2": (0.9, 0.1),
                "head": (0.4, 0.4)}


def family(n_experts: int = 2) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(1234)
    base = {}
    for n, s in SHAPES.items():
        base[n] = (torch.tensor(7, dtype=torch.int64) if n == "step"
                   else torch.randn(s, generator=gen))
    experts = []
    for _ in range(n_experts):
        experts.append({n: t.clone() if not t.is_floating_point()
                        else t + torch.randn(t.shape, generator=gen) for n, t in base.items()})
    return base, experts


def save_family(root: Path, n_experts: int = 2) -> tuple[Path, list[Path]]:
    base, experts = family(n_experts)
    paths = []
    for name, sd in [("base", base)] + [(f"expert{k}", e) for k, e in enumerate(experts)]:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in sd.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny-mlp"}))
        paths.append(folder)
    return paths[0], paths[1:]


def _group(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _target(table: dict[str, tuple[float, ...]]) -> dict[str, torch.Tensor]:
    base, experts = family()
    return {n: base[n] + sum(c * (e[n] - base[n]) for c, e in
                               zip(table[_group(n)], experts, strict=True))
            for n in base if base[n].is_floating_point()}


def _distance(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float:
    return -sum(float(((sd[n].float() - t) ** 2).mean()) for n, t in target.items()) / len(target)


def quadratic(sd: dict[str, torch.Tensor]) -> float:
    return _distance(sd, _target(TARGET))


def quadratic_layers(sd: dict[str, torch.Tensor]) -> dict[str, float]:
    """Layer-wise target; per-expert-direction scores too (for the multi-score code paths)."""
    return {"score": _distance(sd, _target(LAYER_TARGET))}


CALLS = {"n": 0}


def fails_on_fourth(sd: dict[str, torch.Tensor]) -> float:
    """Fails on its fourth call in this process (a user metric breaking mid-search)."""
    CALLS["n"] += 1
    if CALLS["n"] == 4:
        raise RuntimeError("metric server went away")
    return quadratic(sd)


TASK_A = {g: (0.2, 0.8) for g in TARGET}
TASK_B = {g: (0.8, 0.2) for g in TARGET}


def two_tasks(sd: dict[str, torch.Tensor]) -> dict[str, float]:
    """Two exactly quadratic scores in the task-arithmetic weights, best at (0.2, 0.8) and at
    (0.8, 0.2); with the same metric (the task vectors' Gram) for both, an equal preference is
    best at the midpoint (0.5, 0.5)."""
    return {"a": _distance(sd, _target(TASK_A)), "b": _distance(sd, _target(TASK_B))}


def layers_with_fidelity(sd: dict[str, torch.Tensor], fidelity: float = 1.0) -> float:
    """The layer-wise quadratic, plus an offset that shrinks with the data share (a cheap score
    is a biased one): successive halving must still rank within a rung."""
    return _distance(sd, _target(LAYER_TARGET)) - 0.01 * (1 - fidelity)


def close_to_expert1(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Differentiable: −mean over tensors of mean((θ − θ_1)²), best at expert 1 itself (the
    one relevant model of the pool)."""
    _, experts = family(3)
    names = [n for n, t in experts[1].items() if t.is_floating_point()]
    return -sum(((sd[n] - experts[1][n]) ** 2).mean() for n in names) / len(names)


def quadratic_slow(sd: dict[str, torch.Tensor]) -> float:
    """``quadratic``, 50 ms a call: slow enough to kill a run in the middle."""
    import time

    time.sleep(0.05)
    return quadratic(sd)


# -- the data-flow family: two models of square layers, whose best layer path is known ---------

FLOW_SHAPES = {"embed.weight": (4, 3), "layers.0.weight": (4, 4), "layers.0.bias": (4,),
               "layers.1.weight": (4, 4), "layers.1.bias": (4,), "head.weight": (2, 4)}
FLOW_INPUTS = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))


def flow_family() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(99)
    return [{n: torch.randn(s, generator=gen) for n, s in FLOW_SHAPES.items()} for _ in range(2)]


def _save_flow_model(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny-flow",
                                                    "num_hidden_layers": 2}))
    return folder


def save_flow_family(root: Path) -> list[Path]:
    return [_save_flow_model(root / name, sd)
            for name, sd in zip(("a", "b"), flow_family(), strict=True)]


def flow_forward(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """embed, then every ``layers.i`` in order (tanh(W h + b)), then the head: any depth."""
    h = FLOW_INPUTS @ sd["embed.weight"].T
    depth = len({n.split(".")[1] for n in sd if n.startswith("layers.")})
    for i in range(depth):
        h = torch.tanh(h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"])
    return h @ sd["head.weight"].T


def _flow_target(factor: float) -> torch.Tensor:
    """Model a's embedding and layer 0, then model b's layer 1 with its input scaled by
    ``factor``, then b's head: the path a:0 → b:1 written out by hand."""
    a, b = flow_family()
    h = torch.tanh((FLOW_INPUTS @ a["embed.weight"].T) @ a["layers.0.weight"].T
                   + a["layers.0.bias"])
    h = torch.tanh((factor * h) @ b["layers.1.weight"].T + b["layers.1.bias"])
    return h @ b["head.weight"].T


def flow_path(sd: dict[str, torch.Tensor]) -> float:
    return -float(((flow_forward(sd) - _flow_target(1.0)) ** 2).mean())


def flow_path_scaled(sd: dict[str, torch.Tensor]) -> float:
    return -float(((flow_forward(sd) - _flow_target(0.5)) ** 2).mean())


# -- a per-layer method choice: TIES on some layers, task arithmetic on the others -------------

METHOD_TARGET = {"layers.0": "ties", "layers.1": "task_arithmetic", "layers.2": "ties",
                 "head": "task_arithmetic"}


def _ties_by_hand(base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES at weights 1, density 1 (no trim), λ = 1, no normalising: θ₀ + Σ_k [τ_k·γ > 0] τ_k
    with γ = sign(Σ_k τ_k) (Yadav et al. 2023, steps 2-4)."""
    gamma = torch.sign(sum(taus))
    return base + sum(t * (t * gamma > 0) for t in taus)


def _method_target() -> dict[str, torch.Tensor]:
    base, experts = family()
    out = {}
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        taus = [e[n] - b for e in experts]
        out[n] = (_ties_by_hand(b, taus) if METHOD_TARGET[_group(n)] == "ties"
                  else b + sum(taus))
    return out


def per_layer_methods(sd: dict[str, torch.Tensor]) -> float:
    return _distance(sd, _method_target())


# -- three tasks for nested MAP: task t is best at s_t·τ_t alone --------------------------------

THREE_SCALES = (1.0, 0.9, 0.5)


def three_targets() -> list[dict[str, torch.Tensor]]:
    base, experts = family(3)
    return [{n: base[n] + s * (experts[t][n] - base[n]) for n in base
             if base[n].is_floating_point()} for t, s in enumerate(THREE_SCALES)]


def three_tasks(sd: dict[str, torch.Tensor]) -> dict[str, float]:
    """Exactly quadratic in the task-arithmetic weights: −distance to θ₀ + s_t τ_t."""
    return {name: _distance(sd, target)
            for name, target in zip(("a", "b", "c"), three_targets(), strict=True)}


# -- PS then DFS: a base and two experts of the flow shapes; the best model is a task-arithmetic
# merge at weights (0.3, 0.7) with expert b's layer 1 added on top (depth 3) ---------------------

HYBRID_WEIGHTS = (0.3, 0.7)


def hybrid_family() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(123)
    base = {n: torch.randn(s, generator=gen) for n, s in FLOW_SHAPES.items()}
    experts = [{n: t + 0.5 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
               for _ in range(2)]
    return base, experts


def save_hybrid_family(root: Path) -> tuple[Path, list[Path]]:
    base, experts = hybrid_family()
    folders = [_save_flow_model(root / name, sd)
               for name, sd in [("base", base), ("a", experts[0]), ("b", experts[1])]]
    return folders[0], folders[1:]


def _hybrid_target() -> dict[str, torch.Tensor]:
    """θ₀ + 0.3 τ_a + 0.7 τ_b (embedding, layers 0 and 1), then b's layer 1 as layer 2."""
    base, (a, b) = hybrid_family()
    wa, wb = HYBRID_WEIGHTS
    ps = {n: base[n] + wa * (a[n] - base[n]) + wb * (b[n] - base[n]) for n in base}
    out = {n: ps[n] for n in ("embed.weight", "layers.0.weight", "layers.0.bias",
                              "layers.1.weight", "layers.1.bias")}
    out.update({"layers.2.weight": b["layers.1.weight"], "layers.2.bias": b["layers.1.bias"]})
    return out


def ps_then_path(sd: dict[str, torch.Tensor]) -> float:
    """−Σ‖sd − target‖² over the embedding and every layer tensor (head left out), a tensor
    missing on one side counting as zeros: any depth."""
    target = _hybrid_target()
    names = set(target) | {n for n in sd if n != "head.weight"}
    total = 0.0
    for n in sorted(names):
        x = sd.get(n)
        t = target.get(n)
        diff = x - t if x is not None and t is not None else (x if x is not None else t)
        total += float((diff.double() ** 2).sum())
    return -total


def fails_on_light_first_expert(sd: dict[str, torch.Tensor]) -> float:
    """Fails on a candidate whose first expert weighs less than 0.2 in layer 0 (the weight
    solved from the merged tensor: θ = θ₀ + w₀τ₀ + w₁τ₁ by least squares), so the same
    candidate fails in any process: a failure tied to a candidate, not to a call count."""
    base, experts = family()
    name = "layers.0.weight"
    taus = torch.stack([(e[name] - base[name]).reshape(-1) for e in experts], dim=1)
    w = torch.linalg.lstsq(taus, (sd[name].float() - base[name]).reshape(-1, 1)).solution
    if float(w[0]) < 0.2:
        raise RuntimeError(f"first expert too light ({float(w[0]):.2f})")
    return quadratic(sd)
