"""``fw_merging`` — Frank-Wolfe merging over a pool of models (Chen et al., "FW-Merging:
Scaling Model Merging with Frank-Wolfe Optimization", 2025; FusionBench ``fw_hard`` and
``fw_soft``): hard (task arithmetic as the move) and soft (AdaMerging as the move).

The pool is the template's models θ_1..θ_K plus the start x_0 (task arithmetic at scaling s
over the pool, or the base). Each iteration t = 0..T−1:

    g = ∇_x L(x_t)                      L: the objective's loss at the current merge
    task granularity:   v = θ_{m*},   m* = argmin_m Σ_p cos(g_p, θ_{m,p})
    layer granularity:  v_p = θ_{m*_p,p}, m*_p = argmin_m cos(g_p, θ_{m,p}) where that cosine
                        is negative; the tensor does not move otherwise
    γ_t = step_size · 2 / (t + 2);   x_{t+1} = x_t + s·γ_t·(v − x_t)

(cosines with the full parameters θ_m, as the paper; p runs over the merged tensors). Every
iterate is θ₀ + Σ_k c_{p,k} τ_k, so the coefficients c are tracked instead of weights (memory
constant in the pool size beyond the pool itself) and each iterate is written and scored as a
``task_arithmetic`` recipe; the result is the last iterate. The loss: cross-entropy on the
suite's labeled ``val`` split (``limit`` examples per task; the paper's proxy set), or, for a
``python:`` objective, minus its value, which must then be a differentiable torch scalar of the
state dict. A zero gradient stops early.

Where we differ: in layer granularity the paper's vertex for a tensor with no negative cosine
is 0 (the tensor shrinks toward zero); that is not a task-arithmetic merge, so such a tensor
stays.

FW-soft (``variant: soft``, suite objectives): per task the vertex most anti-aligned with that
task's gradient, then AdaMerging with the iterate as the base and those vertices as the experts
learns the move (:func:`frank_wolfe_soft`); ``ada_steps`` AdaMerging steps per iteration
(FusionBench: 500).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

StateDict = Mapping[str, torch.Tensor]


class Simplex:
    """θ₀, the task vectors τ_k, and the vertices — each pool model (coefficients e_m) and the
    start x_0 — as coefficient rows and as full parameters; an iterate is θ₀ + Σ_k c_{p,k} τ_k."""

    def __init__(self, base: StateDict, pool: list[StateDict], start: float) -> None:
        self.names = [n for n, t in base.items() if t.is_floating_point()]
        self.k = len(pool)
        self.theta0 = {n: base[n].float() for n in self.names}
        self.taus = [{n: sd[n].float() - self.theta0[n] for n in self.names} for sd in pool]
        rows = len(self.names)
        self.start = torch.full((rows, self.k), float(start), dtype=torch.float64)
        self.vertices = [torch.eye(self.k, dtype=torch.float64)[m].expand(rows, self.k)
                         for m in range(self.k)] + [self.start]
        self.full = [{n: sd[n].float() for n in self.names} for sd in pool]
        self.full.append(self.params(self.start))

    def params(self, c: torch.Tensor, grad: bool = False) -> dict[str, torch.Tensor]:
        return {n: (self.theta0[n] + sum(float(c[i, k]) * self.taus[k][n]
                                         for k in range(self.k))).requires_grad_(grad)
                for i, n in enumerate(self.names)}

    def gradient(self, loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 c: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """∇L at the iterate c; None at a stationary point (every direction flat)."""
        params = self.params(c, grad=True)
        grads = torch.autograd.grad(loss(params), [params[n] for n in self.names],
                                    allow_unused=True)
        g = {n: (torch.zeros_like(params[n]) if gr is None else gr.detach())
             for n, gr in zip(self.names, grads, strict=True)}
        return None if all(float(v.abs().max()) == 0.0 for v in g.values()) else g

    def cosines(self, g: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """cos(g_p, θ_{v,p}) for every vertex v (rows) and tensor p (columns)."""
        return torch.tensor([[float(torch.nn.functional.cosine_similarity(
            g[n].flatten(), v[n].flatten(), dim=0)) for n in self.names] for v in self.full],
            dtype=torch.float64)


def frank_wolfe(loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], base: StateDict,
                pool: list[StateDict], *, granularity: str = "task", iterations: int = 10,
                step_size: float = 0.1, scaling: float = 0.3, init: str = "ta",
                on_iterate: Callable[[int, torch.Tensor], None] | None = None
                ) -> torch.Tensor:
    """FW-hard: the coefficients c (tensors × K) of the last iterate (see the module
    docstring); ``on_iterate(t, c)`` sees every iterate, x_0 included."""
    simplex = Simplex(base, pool, scaling if init == "ta" else 0.0)
    c = simplex.start.clone()
    if on_iterate is not None:
        on_iterate(0, c.clone())
    for t in range(iterations):
        g = simplex.gradient(loss, c)
        if g is None:
            break
        cos = simplex.cosines(g)
        target = c.clone()
        if granularity == "task":
            target = simplex.vertices[int(cos.sum(1).argmin())].clone()
        else:
            best = cos.argmin(0)
            for i in range(len(simplex.names)):
                if cos[best[i], i] < 0:
                    target[i] = simplex.vertices[int(best[i])][i]
        alpha = scaling * step_size * 2.0 / (t + 2)
        c = c + alpha * (target - c)
        if on_iterate is not None:
            on_iterate(t + 1, c.clone())
    return c


Learn = Callable[[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], float], torch.Tensor]


def frank_wolfe_soft(task_losses: list[Callable[[dict[str, torch.Tensor]], torch.Tensor]],
                     base: StateDict, pool: list[StateDict], learn: Learn, *,
                     iterations: int = 10, scaling: float = 0.3, init: str = "ta",
                     on_iterate: Callable[[int, torch.Tensor], None] | None = None
                     ) -> torch.Tensor:
    """FW-soft: per task j the vertex v_j = argmin_v Σ_p cos(∇L_j(x_t)_p, θ_{v,p}); then
    λ = learn(x_t, [θ_{v_j}], init) (AdaMerging with x_t as the base and the v_j as the
    experts: λ_{p,j} per tensor, init 0.3 at the first iteration, 1e-8 after, as FusionBench's
    ``fw_soft``), and x_{t+1} = x_t + Σ_j λ_{p,j} (θ_{v_j} − x_t) — in coefficients,
    c ← c + Σ_j λ_{·,j} (e_{v_j} − c)."""
    simplex = Simplex(base, pool, scaling if init == "ta" else 0.0)
    c = simplex.start.clone()
    if on_iterate is not None:
        on_iterate(0, c.clone())
    for t in range(iterations):
        picks = []
        for loss in task_losses:  # a task already at a stationary point keeps x_0's vertex
            g = simplex.gradient(loss, c)
            picks.append(simplex.k if g is None else int(simplex.cosines(g).sum(1).argmin()))
        lam = learn(simplex.params(c), [simplex.full[m] for m in picks],
                    0.3 if t == 0 else 1e-8).to(torch.float64)  # (tensors, picks)
        c = c + sum(lam[:, j:j + 1] * (simplex.vertices[m] - c) for j, m in enumerate(picks))
        if on_iterate is not None:
            on_iterate(t + 1, c.clone())
    return c
