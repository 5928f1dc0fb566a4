"""``evolve`` — evolutionary merging (Akiba et al., "Evolutionary Optimization of Model Merging
Recipes", Nature Machine Intelligence 2025; mergekit-evolve), in the parameter space (PS, the
template's genome: :mod:`modelalloy.optimize.space`) or the data-flow space (DFS, a layer path
with input factors: :mod:`modelalloy.optimize.dataflow`; ``search: {space: dataflow}``), or
both in one run, PS then DFS (:mod:`modelalloy.optimize.hybrid`; ``search: {space: ps+dfs}``).

CMA-ES (Hansen's ``cma`` package) maximises the fitness F(x) = Σ_o w_o · score_o(merge(x)) over
the template's genome x ∈ [0, 1]^n; in the parameter space n = cells × models × free per-model
parameters (+ cells × free global ones), gene u being the value lo + u·(hi − lo) of its (layer
group, parameter set, model, parameter). Each generation samples λ candidates
x_i = m + σ·N(0, C), scores them all (in parallel on the workers; the order of the results is
the order of the candidates), and updates m, σ, C from their ranks (CMA minimises −F).

As mergekit-evolve: start at weight 1/K and density 1 (or the template's ``init``), σ₀ = 1/6,
CMA's default population 4 + ⌊3 ln n⌋. Where we differ: the box is CMA's own bound handling
(``bounds: [0, 1]``, the mirror-free BoundTransform) in unit coordinates instead of decoding
|x|; the budget is a hard cap on trials (the last generation is cut, and not told to CMA)
where mergekit's ``maxfevals`` overshoots by up to a generation. cma's ``seed`` 0 means "from
the clock", so the run's seed s is passed as s + 1.

Restarts (IPOP-CMA-ES, Auger & Hansen, CEC 2005): when CMA stops (its own termination
criteria) — or, with ``patience`` P, when the best fitness has not risen for P generations — and
budget is left, CMA starts again from a uniform random point of the box (seeded by s + 1000·r
for restart r) with twice the population and the CMA seed s + 1 + 1000·r; the run's best trial
over all restarts is the result. A path search (DFS) has plateaus (many genomes give the same
path) and deceptive neighbours, where one CMA run settles on a local optimum; the data-flow
test uses ``patience``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelalloy.errors import OptimizeError


def run(ctx: Any) -> None:
    from modelalloy.optimize.hybrid import HybridSpace

    if isinstance(ctx.space, HybridSpace):
        run_hybrid(ctx)
        return
    ctx.notes.update(search(ctx, ctx.space.x0(), ctx.space.dim, ctx.budget))


def run_hybrid(ctx: Any) -> None:
    """PS then DFS (:mod:`modelalloy.optimize.hybrid`): ``ps_budget`` trials (default half the
    budget) in the parameter space; its best genome g* is written as ``OUT/ps_recipe.yaml`` and
    the rest of the budget searches paths over [merge(g*), experts...]."""
    from modelalloy.recipe.load import recipe_from_dict

    space = ctx.space
    ps_budget = ctx.options.get("ps_budget")
    ps_budget = ctx.budget // 2 if ps_budget is None else int(ps_budget)
    if not 1 <= ps_budget <= ctx.budget:
        raise OptimizeError(f"evolve: ps_budget={ps_budget} must be between 1 and the budget "
                            f"({ctx.budget})")
    notes: dict[str, Any] = {"ps": search(ctx, space.x0(), space.dim, ps_budget)}
    best = ctx.best()
    if best is None or ctx.remaining == 0:
        ctx.notes.update(notes)
        return
    ps_genome = [float(u) for u in best["candidate"]]
    absolute = {m: ctx.template.model_reference(m) for m in ctx.template.all_models()}
    where = ctx.out / "ps_recipe.yaml"
    name = f"evolve ps trial {best['trial']} (fitness {best['scores']['fitness']:.4g})"
    ps_recipe = recipe_from_dict(space.ps.recipe_dict(ps_genome, absolute=absolute, name=name),
                                 source=str(where), base_dir=ctx.out)
    tmp = ctx.out / ".ps_recipe.yaml.tmp"
    tmp.write_text(ps_recipe.to_yaml())
    tmp.replace(where)
    notes["ps_trial"] = best["trial"]
    notes["dfs"] = search(ctx, space.flow.x0(), space.flow.dim, ctx.remaining,
                          wrap=lambda x: {"genome": x, "ps": ps_genome}, first=len(ctx.trials))
    ctx.notes.update(notes)


def search(ctx: Any, x0: list[float], dim: int, budget: int, *,
           wrap: Callable[[list[float]], Any] = lambda x: x, first: int = 0
           ) -> dict[str, Any]:
    """IPOP-CMA-ES from ``x0`` over ``dim`` unit genes for at most ``budget`` trials (those
    after trial ``first``); candidates are ``wrap(genome)``. Returns the notes."""
    import cma
    import numpy as np

    popsize = int(ctx.options["popsize"]) if ctx.options.get("popsize") else None
    patience = int(ctx.options["patience"]) if ctx.options.get("patience") else None
    max_restarts = int(ctx.options["restarts"])
    generation = restart = 0
    stops: list[str] = []

    def left() -> int:
        return min(ctx.remaining, first + budget - len(ctx.trials))

    while left() > 0:
        opts: dict[str, Any] = {"seed": int(ctx.seed) + 1 + 1000 * restart,
                                "bounds": [0.0, 1.0], "verbose": -9, "verb_log": 0,
                                "verb_disp": 0}
        if popsize:
            opts["popsize"] = popsize
        # IPOP: the first run from the start point, each restart from a uniform point
        start = x0 if restart == 0 else [
            float(u) for u in np.random.default_rng(int(ctx.seed) + 1000 * restart).uniform(
                0.0, 1.0, dim)]
        es = cma.CMAEvolutionStrategy(start, float(ctx.options["sigma0"]), opts)
        best, stale, cut = None, 0, False
        while left() > 0 and not es.stop():
            xs = es.ask()
            cands = [wrap([float(v) for v in x]) for x in xs][:left()]
            records = ctx.evaluate(cands, tag=f"generation {generation}")
            if len(records) < len(xs):  # the budget cut this generation
                cut = True
                break
            fitness = [r["scores"]["fitness"] for r in records]
            es.tell(xs, [-f for f in fitness])
            generation += 1
            if best is None or max(fitness) > best:
                best, stale = max(fitness), 0
            else:
                stale += 1
            if patience is not None and stale >= patience:
                break
        stops.append("budget" if cut or left() == 0 else
                     ", ".join(es.stop()) or f"no gain in {patience} generations")
        if cut or restart >= max_restarts:
            break
        restart += 1
        popsize = 2 * es.popsize
    return {"generations_told": generation, "popsize": es.popsize,
            "sigma": round(float(es.sigma), 6), "restarts": restart, "stops": stops}
