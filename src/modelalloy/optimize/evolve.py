"""``evolve`` — evolutionary merging in the parameter space (Akiba et al., "Evolutionary
Optimization of Model Merging Recipes", Nature Machine Intelligence 2025; mergekit-evolve).

CMA-ES (Hansen's ``cma`` package) maximises the fitness F(x) = Σ_o w_o · score_o(merge(x)) over
the template's genome x ∈ [0, 1]^n, n = cells × models × free per-model parameters (+ cells ×
free global ones); gene u is the value lo + u·(hi − lo) of its (layer group, parameter set,
model, parameter). Each generation samples λ candidates x_i = m + σ·N(0, C), scores them all
(in parallel on the workers; the order of the results is the order of the candidates), and
updates m, σ, C from their ranks (CMA minimises −F).

As mergekit-evolve: start at weight 1/K and density 1 (or the template's ``init``), σ₀ = 1/6,
CMA's default population 4 + ⌊3 ln n⌋. Where we differ: the box is CMA's own bound handling
(``bounds: [0, 1]``, the mirror-free BoundTransform) in unit coordinates instead of decoding
|x|; the budget is a hard cap on trials (the last generation is cut, and not told to CMA)
where mergekit's ``maxfevals`` overshoots by up to a generation. cma's ``seed`` 0 means "from
the clock", so the run's seed s is passed as s + 1.
"""

from __future__ import annotations

from typing import Any


def run(ctx: Any) -> None:
    import cma

    opts: dict[str, Any] = {"seed": int(ctx.seed) + 1, "bounds": [0.0, 1.0], "verbose": -9,
                            "verb_log": 0, "verb_disp": 0}
    if ctx.options.get("popsize"):
        opts["popsize"] = int(ctx.options["popsize"])
    es = cma.CMAEvolutionStrategy(ctx.space.x0(), float(ctx.options["sigma0"]), opts)
    generation = 0
    while ctx.remaining > 0 and not es.stop():
        xs = es.ask()
        records = ctx.evaluate([[float(v) for v in x] for x in xs], tag=f"generation {generation}")
        if len(records) < len(xs):  # the budget cut this generation
            break
        es.tell(xs, [-r["scores"]["fitness"] for r in records])
        generation += 1
    ctx.notes.update({"generations_told": generation, "popsize": es.popsize,
                      "sigma": round(float(es.sigma), 6)})
