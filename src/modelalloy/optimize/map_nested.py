"""Nested MAP (Li et al., ICLR 2025, §"Nested MAP"; luli-git/MAP ``run_MAP_nested``): MAP for
many tasks as a sequence of two-model problems.

Each model k of a task-wise task-arithmetic template is a group G = {k} with the unit-weight
vector g = e_k and a single-model score acc(G) (the one-hot genome e_k scored on the task of
model k). While more than one group is left: take the pair (G₁, G₂) whose scores are closest,
run two-dimensional MAP over (α, β) ∈ [0, 1]² on the genome w = α·g₁ + β·g₂ (``points``
designed points, quadratic surrogates of the metrics of the pair's tasks, NSGA-III), pick the
front point maximising Σ_t p_t·m_t(α, β) over those tasks (p: ``preference``), score it for
real, and replace the pair by the group G₁ ∪ G₂ with g = α·g₁ + β·g₂ and acc = the mean of its
tasks' real scores. Because task arithmetic is linear in the task vectors, merging a merged
pair again is θ₀ + α'(α τ_i + β τ_j) + β' τ_k: every round's candidate is a genome of the
template, and the result is one task-arithmetic recipe. The cost grows as (T − 1) two-variable
problems instead of a T-variable one.

Model k's task is metric k (``tasks``: the metric names in model order; default the objective's
metrics in the order it reports them). The genome must be the template's per-model ``weight``
at task granularity with lower bound 0, so that α·g stays a weight vector. Where we differ: the
pick weights each task's own surrogate by its preference (the paper's code sums the
preferences of each side of the pair and weights the front with that pair vector).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelalloy.errors import OptimizeError


def _check_space(space: Any) -> int:
    k = len(space.models)
    ok = (space.granularity == "task" and [b.name for b in space.bounds] == ["weight"]
          and space.dim == k and space.bound("weight").lo == 0.0)
    if not ok:
        raise OptimizeError(f"{space.source}: map variant nested needs a task-wise template "
                            "whose only free parameter is the per-model weight, lower bound 0 "
                            "(search: {parameters: {weight: [0, 1]}})")
    return k


def run_nested(ctx: Any) -> None:
    from modelalloy.optimize.map_search import (
        Surrogate,
        _write_front,
        design_points,
        metric_keys,
        nsga3_front,
    )

    k = _check_space(ctx.space)
    if k < 2:
        raise OptimizeError("map variant nested needs at least 2 models")
    singles = ctx.evaluate([[1.0 if i == j else 0.0 for i in range(k)] for j in range(k)],
                           tag="single models", limit_budget=False)
    keys = metric_keys(singles[0]["scores"], len(ctx.objectives.items))
    given = ctx.options.get("tasks")
    tasks = ([t.strip() for t in given.split(",")] if isinstance(given, str) else
             list(given) if given else keys)
    if len(tasks) != k or any(t not in keys for t in tasks):
        raise OptimizeError(f"map variant nested: give one metric per model, in model order "
                            f"(the option tasks=M1,M2,...); the models are {k}, the metrics "
                            f"{', '.join(keys)}")
    pref = ctx.options["preference"] or [1.0] * k
    if len(pref) != k:
        raise OptimizeError(f"map: preference needs {k} values ({', '.join(tasks)})")
    n = int(ctx.options["points"] or 20)
    rng = np.random.default_rng(ctx.seed)
    # a group: (its models' task indices, its unit-weight vector, its score)
    groups = [([j], np.eye(k)[j], float(singles[j]["scores"][tasks[j]])) for j in range(k)]
    rounds = []
    chosen = None
    while len(groups) > 1:
        a, b = min(((i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))),
                   key=lambda ij: (abs(groups[ij[0]][2] - groups[ij[1]][2]), ij))
        (ta, ga, _), (tb, gb, _) = groups[a], groups[b]
        members = ta + tb
        names = [tasks[t] for t in members]

        def genome(ab: np.ndarray, ga: np.ndarray = ga, gb: np.ndarray = gb) -> list[float]:
            return [round(float(v), 12) for v in ab[0] * ga + ab[1] * gb]

        design = design_points(2, n, rng)
        records = ctx.evaluate([genome(np.asarray(p)) for p in design],
                               tag=f"round {len(rounds) + 1}", limit_budget=False)
        x = np.asarray(design)
        y = np.array([[r["scores"][m] for m in names] for r in records])
        warp = ctx.options["warp"]
        if warp == "auto":
            warp = "sigmoid" if ((y >= 0) & (y <= 1)).all() else "none"
        models = [Surrogate(x, y[:, i], warp) for i in range(len(names))]
        front_x, front_f = nsga3_front(models, 2, seed=ctx.seed,
                                       pop=int(ctx.options["population"]),
                                       generations=int(ctx.options["generations"]))
        w = np.array([pref[t] for t in members], dtype=float)
        best = int(np.argmax(front_f @ (w / w.sum())))
        real = ctx.evaluate([genome(front_x[best])], tag=f"round {len(rounds) + 1} pick",
                            limit_budget=False)[0]
        merged = front_x[best, 0] * ga + front_x[best, 1] * gb
        score = float(np.mean([real["scores"][m] for m in names]))
        rounds.append({"pair": [[tasks[t] for t in ta], [tasks[t] for t in tb]],
                       "alpha_beta": [round(float(v), 6) for v in front_x[best]],
                       "predicted": [round(float(v), 6) for v in front_f[best]],
                       "real": [real["scores"][m] for m in names]})
        groups = [g for i, g in enumerate(groups) if i not in (a, b)] + [
            (members, merged, score)]
        chosen = (real, front_x, front_f, [best], names)
    assert chosen is not None
    real, front_x, front_f, picks, names = chosen
    ctx.chosen = real["trial"]
    ctx.notes.update({"variant": "nested", "tasks": tasks, "rounds": rounds,
                      "front_prediction_error": round(float(np.mean(np.abs(
                          np.array(rounds[-1]["real"]) - np.array(rounds[-1]["predicted"])))),
                          6)})
    _write_front(ctx, names, front_x, front_f, picks, [real])
