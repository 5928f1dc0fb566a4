"""``evolve`` — evolutionary merging (Akiba et al., "Evolutionary Optimization of Model Merging
Recipes", Nature Machine Intelligence 2025; mergekit-evolve), in the parameter space (PS, the
template's genome: :mod:`modelalloy.optimize.space`) or the data-flow space (DFS, a layer path
with input factors: :mod:`modelalloy.optimize.dataflow`; ``search: {space: dataflow}``).

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

from typing import Any


def run(ctx: Any) -> None:
    import cma
    import numpy as np

    popsize = int(ctx.options["popsize"]) if ctx.options.get("popsize") else None
    patience = int(ctx.options["patience"]) if ctx.options.get("patience") else None
    max_restarts = int(ctx.options["restarts"])
    generation = restart = 0
    stops: list[str] = []
    while ctx.remaining > 0:
        opts: dict[str, Any] = {"seed": int(ctx.seed) + 1 + 1000 * restart,
                                "bounds": [0.0, 1.0], "verbose": -9, "verb_log": 0,
                                "verb_disp": 0}
        if popsize:
            opts["popsize"] = popsize
        # IPOP: the first run from the template's start, each restart from a uniform point
        x0 = ctx.space.x0() if restart == 0 else [
            float(u) for u in np.random.default_rng(int(ctx.seed) + 1000 * restart).uniform(
                0.0, 1.0, ctx.space.dim)]
        es = cma.CMAEvolutionStrategy(x0, float(ctx.options["sigma0"]), opts)
        best, stale, cut = None, 0, False
        while ctx.remaining > 0 and not es.stop():
            xs = es.ask()
            records = ctx.evaluate([[float(v) for v in x] for x in xs],
                                   tag=f"generation {generation}")
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
        stops.append("budget" if cut or ctx.remaining == 0 else
                     ", ".join(es.stop()) or f"no gain in {patience} generations")
        if cut or restart >= max_restarts:
            break
        restart += 1
        popsize = 2 * es.popsize
    ctx.notes.update({"generations_told": generation, "popsize": es.popsize,
                      "sigma": round(float(es.sigma), 6), "restarts": restart,
                      "stops": stops})
