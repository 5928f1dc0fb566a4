"""``map`` — Model merging with Amortized Pareto fronts (Li et al., ICLR 2025; luli-git/MAP).

The decision variables are the genome c ∈ [0, 1]^d of the template (for MAP's own setting, the
task-wise task-arithmetic weights, d = number of models). MAP

1. scores n designed points: the d one-hot vectors plus a random subset of the grid with
   ⌈(2n)^{1/d}⌉ values per axis (one-hot and isotropic points removed), n = (d+1)(d+2) — twice
   the number of coefficients of a quadratic in d variables;
2. fits, for every metric t (each task of a suite, each named score of a Python objective), a
   quadratic surrogate m_t(c) ≈ act(Σ_i a_i c_i² + Σ_{i<j} b_ij c_i c_j + Σ_i d_i c_i + e) by
   least squares (act = sigmoid for metrics in [0, 1] such as accuracies — scipy's
   ``curve_fit`` from all-ones, as the paper's code — else the identity, an exact linear
   least-squares fit);
3. runs NSGA-III (pymoo) on the T surrogates: population 100, 25 generations (the paper's
   runner), SBX/polynomial mutation with η = 20;
4. picks the front point maximising the preference wᵀ m(c) (w normalised; ``preference``,
   default equal) and scores it — plus up to ``reevaluate`` − 1 other front points, spread
   along the front — for real, to report the error between the predicted and the real front.

Where we differ: the reference directions are Das–Dennis points, as many as the population
holds (DEAP's two-layer set in the paper gives far fewer on two objectives); the Bayesian
(adaptive sampling) and nested (pairwise) variants are not implemented.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np


def design_points(d: int, n: int, rng: np.random.Generator) -> list[list[float]]:
    """The one-hot vectors, then random grid points (no one-hot, no isotropic), n in all."""
    pts = [list(map(float, row)) for row in np.eye(d)]
    per_axis = max(2, math.ceil((2 * n) ** (1 / d)))
    axis = np.linspace(0.0, 1.0, per_axis)
    if per_axis ** d <= 200_000:
        grid = np.array(np.meshgrid(*[axis] * d, indexing="ij")).reshape(d, -1).T
    else:  # too many to list: draw grid points
        grid = axis[rng.integers(0, per_axis, size=(20 * n, d))]
    keep = [g for g in grid
            if not (np.count_nonzero(g) == 1 and np.isclose(g.max(), 1.0))
            and not np.allclose(g, g[0])]
    order = rng.permutation(len(keep))
    for i in order[:max(0, n - d)]:
        pts.append([float(v) for v in keep[i]])
    return pts[:n]


def features(x: np.ndarray) -> np.ndarray:
    """[c_i², c_i c_j (i<j), c_i, 1] per row."""
    d = x.shape[1]
    cols = [x[:, i] ** 2 for i in range(d)]
    cols += [x[:, i] * x[:, j] for i, j in combinations(range(d), 2)]
    cols += [x[:, i] for i in range(d)] + [np.ones(len(x))]
    return np.stack(cols, axis=1)


class Surrogate:
    """One metric's quadratic model, optionally through a sigmoid."""

    def __init__(self, x: np.ndarray, y: np.ndarray, warp: str) -> None:
        phi = features(x)
        self.warp = warp
        if warp == "sigmoid":
            from scipy.optimize import curve_fit

            def f(p: np.ndarray, *beta: float) -> np.ndarray:
                return 1 / (1 + np.exp(-(p @ np.asarray(beta))))

            beta, _ = curve_fit(f, phi, y, p0=np.ones(phi.shape[1]), maxfev=20000)
            self.beta = np.asarray(beta)
        else:
            self.beta = np.linalg.lstsq(phi, y, rcond=None)[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = features(np.atleast_2d(x)) @ self.beta
        return 1 / (1 + np.exp(-z)) if self.warp == "sigmoid" else z


def metric_keys(scores: dict[str, float], n_objectives: int) -> list[str]:
    """The scores MAP trades off: each objective's named scores other than its ``score``
    (a suite's tasks), or its ``score`` when it has no other."""
    keys = []
    for i in range(n_objectives):
        prefix = f"{i}:" if n_objectives > 1 else ""
        own = [k for k in scores if k.startswith(prefix) and k != "fitness"
               and (not prefix or ":" in k) and k[len(prefix):] != "score"]
        keys += own or [f"{prefix}score"]
    return keys


def nsga3_front(models: list[Surrogate], d: int, *, seed: int, pop: int, generations: int
                ) -> tuple[np.ndarray, np.ndarray]:
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    t = len(models)
    partitions = 1
    while math.comb(partitions + 1 + t - 1, t - 1) <= pop:
        partitions += 1
    ref_dirs = get_reference_directions("das-dennis", t, n_partitions=partitions)

    class Surrogates(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=d, n_obj=t, xl=0.0, xu=1.0)

        def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kw: Any) -> None:
            out["F"] = -np.stack([m(x) for m in models], axis=1)

    res = minimize(Surrogates(), NSGA3(pop_size=pop, ref_dirs=ref_dirs),
                   ("n_gen", generations), seed=seed + 1, verbose=False)
    xs = np.atleast_2d(res.X)
    return xs, np.stack([m(xs) for m in models], axis=1)


def default_budget(space: Any, options: dict[str, Any]) -> int:
    return int(options["points"] or (space.dim + 1) * (space.dim + 2))


def run(ctx: Any) -> None:
    from modelalloy.errors import OptimizeError

    d = ctx.space.dim
    n = int(ctx.options["points"] or (d + 1) * (d + 2))
    rng = np.random.default_rng(ctx.seed)
    samples = ctx.evaluate(design_points(d, n, rng), tag="design")
    keys = metric_keys(samples[0]["scores"], len(ctx.objectives.items))
    if len(keys) < 2:
        raise OptimizeError("map trades off several scores: give a suite objective (one score "
                            "per task), several --objective, or a Python objective returning "
                            "named scores")
    x = np.array([r["candidate"] for r in samples])
    y = np.array([[r["scores"][k] for k in keys] for r in samples])
    warp = ctx.options["warp"]
    if warp == "auto":
        warp = "sigmoid" if ((y >= 0) & (y <= 1)).all() else "none"
    models = [Surrogate(x, y[:, j], warp) for j in range(len(keys))]
    fit = np.abs(np.stack([m(x) for m in models], axis=1) - y)
    front_x, front_f = nsga3_front(models, d, seed=ctx.seed, pop=int(ctx.options["population"]),
                                   generations=int(ctx.options["generations"]))
    pref = np.asarray(ctx.options["preference"] or [1.0] * len(keys), dtype=float)
    if pref.shape != (len(keys),):
        raise OptimizeError(f"map: preference needs {len(keys)} values ({', '.join(keys)})")
    pref = pref / pref.sum()
    best = int(np.argmax(front_f @ pref))
    spread = [int(i) for i in np.argsort(front_f[:, 0]) if int(i) != best]
    extra = min(len(spread), max(0, int(ctx.options["reevaluate"]) - 1))
    picks = [best] + [spread[int(j)] for j in
                      np.unique(np.linspace(0, len(spread) - 1, extra).round().astype(int))]
    real = ctx.evaluate([[float(v) for v in front_x[i]] for i in picks], tag="front",
                        limit_budget=False)
    err = np.abs(np.array([[r["scores"][k] for k in keys] for r in real]) - front_f[picks])
    ctx.chosen = real[0]["trial"]
    ctx.notes.update({
        "metrics": keys, "warp": warp, "design_points": len(samples),
        "surrogate_fit_error": round(float(fit.mean()), 6), "front_size": len(front_x),
        "front_prediction_error": round(float(err.mean()), 6),
        "preference": [round(float(p), 4) for p in pref]})
    _write_front(ctx, keys, front_x, front_f, picks, real)


def _write_front(ctx: Any, keys: list[str], front_x: np.ndarray, front_f: np.ndarray,
                 picks: list[int], real: list[dict[str, Any]]) -> None:
    import json

    from modelalloy.optimize.report import _plt

    rows = [{"genome": [round(float(v), 6) for v in front_x[i]],
             "predicted": dict(zip(keys, map(float, front_f[i]), strict=True))}
            for i in range(len(front_x))]
    for i, r in zip(picks, real, strict=True):
        rows[i]["real"] = {k: r["scores"][k] for k in keys}
        rows[i]["trial"] = r["trial"]
    (ctx.out / "front.json").write_text(json.dumps(rows, indent=1))
    table = ["| genome | " + " | ".join(f"{k} predicted | {k} real" for k in keys) + " |",
             "|---|" + "---:|---:|" * len(keys)]
    for row in sorted(rows, key=lambda r: -r["predicted"][keys[0]]):
        real_row = row.get("real", {})
        table.append(f"| {row['genome']} | " + " | ".join(
            f"{row['predicted'][k]:.4f} | "
            + (f"{real_row[k]:.4f}" if k in real_row else "") for k in keys) + " |")
    (ctx.out / "front.md").write_text("\n".join(table) + "\n")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(front_f[:, 0], front_f[:, 1], s=12, label="predicted front")
    ax.scatter([r["scores"][keys[0]] for r in real], [r["scores"][keys[1]] for r in real],
               marker="x", color="C3", label="re-evaluated")
    ax.set_xlabel(keys[0])
    ax.set_ylabel(keys[1])
    ax.set_title(f"MAP front ({keys[0]} vs {keys[1]})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.out / "pareto.png", dpi=110)
    plt.close(fig)
