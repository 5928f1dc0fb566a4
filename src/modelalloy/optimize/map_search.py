"""``map`` — Model merging with Amortized Pareto fronts (Li et al., ICLR 2025; luli-git/MAP).

The decision variables are the genome c ∈ [0, 1]^d of the template (for MAP's own setting, the
task-wise task-arithmetic weights, d = number of models). MAP

1. scores n designed points: the d one-hot vectors plus a random subset of the grid with
   ⌈(2n)^{1/d}⌉ values per axis (one-hot and isotropic points removed), n = (d+1)(d+2) — twice
   the number of coefficients of a quadratic in d variables;
2. fits, for every metric t (each task of a suite, each named score of a Python objective), a
   quadratic surrogate m_t(c) ≈ act(Σ_i a_i c_i² + Σ_{i<j} b_ij c_i c_j + Σ_i d_i c_i + e) by
   least squares (act = sigmoid for metrics in [0, 1] such as accuracies — Levenberg–Marquardt
   from all-ones, as the paper's ``curve_fit``, plus a ridge term λ‖β‖², λ = 1e-4 — else the
   identity, an exact linear least-squares fit);
3. runs NSGA-III (pymoo) on the T surrogates: population 100, 25 generations (the paper's
   runner), SBX/polynomial mutation with η = 20;
4. picks the front point maximising the preference wᵀ m(c) (w normalised; ``preference``,
   default equal) and scores it — plus up to ``reevaluate`` − 1 other front points, spread
   along the front — for real, to report the error between the predicted and the real front.

**Bayesian MAP** (``variant=bayesian``; the paper's adaptive sampling, for few tasks): after
the first ``schedule[0]`` designed points, each round r fits the surrogates and, per metric t,
draws ``schedule[r]`` new points where t's surrogate is least sure: the points' hyperspherical
angles φ (φ_i = atan2(‖c_{i+1:}‖, c_i) ∈ [0, π/2]) are binned, n_bins per angle (4 for d < 4,
else 2); bin b scores s_b = mean of its squared surrogate errors + λ·std of that mean over 30
subsamples that each drop 20 % of the bin's points (λ = 0.5); p ∝ softmax(s/τ), τ = 0.07;
a bin with no point gets p = 0 (as the paper's code); a drawn bin gives angles uniform inside
it and a radius r ~ U(0.2, 0.8), c = r·(unit vector of the angles), clipped to the box. Every
new point is scored on every metric (the paper's code scores each task's points on that task
only), the surrogates refit on all points, and the front is found and re-evaluated as above.

Where we differ: the reference directions are Das–Dennis points, as many as the population
holds (DEAP's two-layer set in the paper gives far fewer on two objectives); the bootstrap
drops 20 % of the bin's points afresh each time (the paper's code drops 20 % of what the
previous draw left); the sigmoid fit adds the ridge term (saturated accuracies have no finite
unpenalised optimum, and the paper's fit then ends on the last bits of the arithmetic, which
differ between processes). The nested (pairwise) variant is :mod:`modelalloy.optimize.map_nested`.
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


RIDGE = 1e-4  # λ of the sigmoid fit's penalty λ‖β‖² (see Surrogate)


class Surrogate:
    """One metric's quadratic model, optionally through a sigmoid."""

    def __init__(self, x: np.ndarray, y: np.ndarray, warp: str) -> None:
        phi = features(x)
        self.warp = warp
        if warp == "sigmoid":
            from scipy.optimize import least_squares

            # Accuracies that sit at 0 or 1 let the unpenalised fit run β off towards ±1e6 (a
            # saturated point's logit has no finite optimum), and where a finite-difference
            # Jacobian stops it hangs on the last bits of the arithmetic, which differ between
            # processes (issue 15: two runs, one seed, two fronts). A small ridge term gives
            # one finite minimum, the exact Jacobian finds it to ~1e-13.
            def residuals(beta: np.ndarray) -> np.ndarray:
                return np.concatenate([_sigmoid(phi @ beta) - y, RIDGE ** 0.5 * beta])

            def jacobian(beta: np.ndarray) -> np.ndarray:
                s = _sigmoid(phi @ beta)
                return np.vstack([phi * (s * (1 - s))[:, None],
                                  RIDGE ** 0.5 * np.eye(len(beta))])

            self.beta = least_squares(residuals, np.ones(phi.shape[1]), jac=jacobian,
                                      method="lm", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                                      max_nfev=20000).x
        else:
            self.beta = np.linalg.lstsq(phi, y, rcond=None)[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = features(np.atleast_2d(x)) @ self.beta
        return _sigmoid(z) if self.warp == "sigmoid" else z


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


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
    if options.get("variant") == "nested":  # singles + (K−1) rounds of points + a pick
        k = space.dim
        return k + (k - 1) * (int(options["points"] or 20) + 1)
    if options.get("variant") == "bayesian":  # a cap for up to 16 metrics: the schedule
        plan = schedule(options, space.dim)   # decides (a round that would pass it is cut)
        return plan[0] + 16 * sum(plan[1:])
    return int(options["points"] or (space.dim + 1) * (space.dim + 2))


def schedule(options: dict[str, Any], d: int) -> list[int]:
    """Bayesian MAP's sampling schedule: first designed points, then new points per metric
    and round (default: (d+1)(d+2) designed, then 2 rounds of 3)."""
    given = options.get("schedule")
    if not given:
        return [int(options["points"] or (d + 1) * (d + 2)), 3, 3]
    values = [int(v) for v in (given.split(",") if isinstance(given, str) else given)]
    if not values or min(values) < 1:
        from modelalloy.errors import OptimizeError

        raise OptimizeError("map: schedule needs whole numbers ≥ 1 (first designed points, "
                            "then new points per metric and round), e.g. 12,3,3")
    return values


def to_angles(x: np.ndarray) -> np.ndarray:
    """Hyperspherical angles of each row: φ_i = atan2(‖x_{i+1:}‖, x_i), i < d − 1."""
    tail = np.sqrt(np.cumsum(np.square(x)[:, ::-1], axis=1)[:, ::-1])
    return np.arctan2(tail[:, 1:], x[:, :-1])


def from_angles(phi: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Rows r·(cos φ₁, sin φ₁ cos φ₂, ..., sin φ₁ ⋯ sin φ_{d−1})."""
    n, k = phi.shape
    sin_prod = np.concatenate([np.ones((n, 1)), np.cumprod(np.sin(phi), axis=1)], axis=1)
    cos = np.concatenate([np.cos(phi), np.ones((n, 1))], axis=1)
    return r[:, None] * sin_prod * cos


def bins_per_angle(d: int) -> int:
    return 4 if d < 4 else 2


def bin_probabilities(x: np.ndarray, errors: np.ndarray, n_bins: int, rng: np.random.Generator,
                      *, lam: float = 0.5, temperature: float = 0.07, drop: float = 0.2,
                      draws: int = 30) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The angle bins and the probability of drawing each: softmax over bins of (mean squared
    error + λ·std of the mean over subsamples without ``drop`` of the points) / τ; empty
    bins 0."""
    from itertools import product

    phi = to_angles(x)
    width = (np.pi / 2) / n_bins
    index = np.minimum((phi / width).astype(int), n_bins - 1)
    bins = list(product(range(n_bins), repeat=phi.shape[1]))
    scores = np.full(len(bins), -np.inf)
    for b, cell in enumerate(bins):
        members = np.flatnonzero((index == np.array(cell)).all(axis=1))
        if len(members) == 0:
            continue
        keep = len(members) - int(drop * len(members))
        means = [errors[rng.choice(members, keep, replace=False)].mean() for _ in range(draws)]
        scores[b] = errors[members].mean() + lam * float(np.std(means))
    z = (scores - scores.max()) / temperature
    p = np.where(np.isfinite(z), np.exp(z), 0.0)
    return bins, p / p.sum()


def adaptive_points(x: np.ndarray, errors: np.ndarray, count: int, rng: np.random.Generator
                    ) -> list[list[float]]:
    """``count`` new points where the surrogate errs most (Bayesian MAP, one metric)."""
    n_bins = bins_per_angle(x.shape[1])
    bins, p = bin_probabilities(x, errors, n_bins, rng)
    width = (np.pi / 2) / n_bins
    chosen = rng.choice(len(bins), size=count, p=p)
    lows = np.array([bins[b] for b in chosen], dtype=float) * width
    phi = lows + rng.uniform(0.0, width, size=lows.shape)
    r = np.clip(rng.uniform(0.2, 0.8, size=count), 0.0, 1.5)
    pts = np.clip(from_angles(phi, r), 0.0, 1.0)
    return [[float(v) for v in row] for row in pts]


def run(ctx: Any) -> None:
    from modelalloy.errors import OptimizeError

    d = ctx.space.dim
    variant = ctx.options["variant"]
    if variant not in ("plain", "bayesian", "nested"):
        raise OptimizeError(f"map: variant '{variant}': use plain, bayesian or nested")
    if variant == "nested":  # pairwise rounds: optimize/map_variants.py dispatches them
        raise OptimizeError("map: the nested variant runs through optimize.map_variants.run")
    plan = schedule(ctx.options, d) if variant == "bayesian" else [
        int(ctx.options["points"] or (d + 1) * (d + 2))]
    if d < 2 and variant == "bayesian":
        raise OptimizeError("map: variant bayesian bins the angles of the genome: it needs "
                            "at least 2 genes")
    need = (d + 1) * (d + 2) // 2  # coefficients of a quadratic in d variables
    if plan[0] < need:
        raise OptimizeError(f"map: {plan[0]} designed points cannot fit a quadratic in {d} "
                            f"genes ({need} coefficients): set the option points={need} or "
                            f"more (default {(d + 1) * (d + 2)})")
    rng = np.random.default_rng(ctx.seed)
    samples = ctx.evaluate(design_points(d, plan[0], rng), tag="design")
    if len(samples) < need:
        raise OptimizeError(f"map: a budget of {len(samples)} trials cannot fit a quadratic "
                            f"in {d} genes ({need} coefficients): give budget={need} or more",
                            options=("budget",))
    keys = metric_keys(samples[0]["scores"], len(ctx.objectives.items))
    if len(keys) < 2:
        raise OptimizeError("map trades off several scores: give a suite objective (one score "
                            "per task), several objectives, or a Python objective returning "
                            "named scores")
    warp = ctx.options["warp"]

    def fit_all() -> tuple[np.ndarray, np.ndarray, str, list[Surrogate]]:
        x = np.array([r["candidate"] for r in samples])
        y = np.array([[r["scores"][k] for k in keys] for r in samples])
        act = warp if warp != "auto" else (
            "sigmoid" if ((y >= 0) & (y <= 1)).all() else "none")
        return x, y, act, [Surrogate(x, y[:, j], act) for j in range(len(keys))]

    x, y, warp_used, models = fit_all()
    for rnd, count in enumerate(plan[1:], start=1):  # Bayesian MAP's adaptive rounds
        new = []
        for j, m in enumerate(models):
            new += adaptive_points(x, (m(x) - y[:, j]) ** 2, count, rng)
        if ctx.remaining < len(new):
            break
        samples += ctx.evaluate(new, tag=f"adaptive round {rnd}")
        x, y, warp_used, models = fit_all()
    warp = warp_used
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
        "metrics": keys, "warp": warp, "design_points": len(samples), "variant": variant,
        "surrogate_fit_error": round(float(fit.mean()), 6), "front_size": len(front_x),
        "front_prediction_error": round(float(err.mean()), 6),
        "preference": [round(float(p), 4) for p in pref]})
    _write_front(ctx, keys, front_x, front_f, picks, real)


def _write_front(ctx: Any, keys: list[str], front_x: np.ndarray, front_f: np.ndarray,
                 picks: list[int], real: list[dict[str, Any]]) -> None:
    import json

    from modelalloy.optimize.report import _plt

    rows: list[dict[str, Any]] = [
        {"genome": [round(float(v), 6) for v in front_x[i]],
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
