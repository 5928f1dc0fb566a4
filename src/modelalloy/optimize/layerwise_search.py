"""``layerwise_search`` — MedSAMix's zero-order search over per-layer(-group) merge
configurations (Yang et al., "MedSAMix: A Training-Free Model Merging Approach for Medical Image
Segmentation", AAAI 2026), with multi-fidelity successive halving.

The configuration is the template's genome (per layer group and parameter set: each model's
weight, density, ...). A sampler proposes configurations c; each is scored on a growing share
of the objective's data, f_r = η^{r−R+1} for rungs r = 0..R−1 (η = ``reduction_factor``,
R = ``rungs``; with the defaults 1/9, 1/3, 1), and successive halving (Optuna's
``SuccessiveHalvingPruner``) stops a configuration at rung r unless its score is in the top
1/η of those that reached r. Only full-fidelity scores count as results. The sampler is
Optuna's TPE (seeded), its first trial the template's start point, so the search starts from
the uniform configuration; candidates are proposed ``batch`` at a time (a fixed number, so the
search does not depend on the number of workers) and scored in parallel.

Per-cell method choice (``search: {methods: [ties, task_arithmetic, ...]}``, the paper's
per-layer choice of merge operator): each cell also gets a categorical gene — which method
merges its tensors (Optuna's categorical distribution; the template's method is the start).
The parameters are shared: a cell uses those its method has. A genome whose cells use several
methods is a staged candidate: one stage per method used (the genome's recipe with that method,
over the whole model), then ``linear`` over the stages with weight 1 on the cells of the
stage's method and 0 elsewhere (normalised: exactly the chosen stage's values); written as
mergekit-multi's format, which ``modelalloy merge-multi`` reproduces bit for bit.

Where we differ from the paper: MedSAMix uses SMAC (random-forest surrogate) and, for several
tasks, ParEGO; here the sampler is TPE and several objectives are scalarised by ``--weights``
(Σ w·score).
"""

from __future__ import annotations

from typing import Any

from modelalloy.optimize.space import METHOD, method_index, method_unit


def run(ctx: Any) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    eta = int(ctx.options["reduction_factor"])
    rungs = int(ctx.options["rungs"])
    fidelities = [float(eta) ** (r - rungs + 1) for r in range(rungs)]
    sampler = optuna.samplers.TPESampler(seed=ctx.seed,
                                         n_startup_trials=int(ctx.options["startup"]))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    names = [f"g{i}" for i in range(ctx.space.dim)]
    methods = list(getattr(ctx.space, "methods", []))
    categorical = {i for i, g in enumerate(ctx.space.genes) if g.param == METHOD}
    start = {n: (methods[method_index(u, len(methods))] if i in categorical else u)
             for i, (n, u) in enumerate(zip(names, ctx.space.x0(), strict=True))}
    study.enqueue_trial(start)

    def suggest(trial: Any, i: int, name: str) -> float:
        # a cell's method is a categorical choice (TPE models it as one), kept in the genome
        # as the middle of its interval of [0, 1]
        if i in categorical:
            return method_unit(methods.index(trial.suggest_categorical(name, methods)),
                               len(methods))
        return trial.suggest_float(name, 0.0, 1.0)

    batch = int(ctx.options["batch"])
    completed = pruned = 0
    while ctx.remaining > 0:
        trials = [study.ask() for _ in range(batch)]
        genomes = [[suggest(t, i, n) for i, n in enumerate(names)] for t in trials]
        alive = list(range(batch))
        for r, fidelity in enumerate(fidelities):
            if not alive or ctx.remaining == 0:
                break
            cands = [genomes[i] if fidelity >= 1.0 else {"genome": genomes[i],
                                                         "fidelity": fidelity} for i in alive]
            records = ctx.evaluate(cands, tag=f"rung {r} (fidelity {fidelity:.3g})")
            survivors = []
            for i, rec in zip(alive, records, strict=False):
                value = rec["scores"]["fitness"]
                trials[i].report(value, step=eta ** r)
                if fidelity >= 1.0:
                    study.tell(trials[i], value)
                    completed += 1
                elif trials[i].should_prune():
                    study.tell(trials[i], state=optuna.trial.TrialState.PRUNED)
                    pruned += 1
                else:
                    survivors.append(i)
            for i in alive[len(records):]:  # cut by the budget
                study.tell(trials[i], state=optuna.trial.TrialState.FAIL)
            alive = survivors
        for i in alive:  # the budget ran out before their last rung
            study.tell(trials[i], state=optuna.trial.TrialState.FAIL)
    if completed == 0 and ctx.trials:  # a budget too small for any last rung: score the
        # configuration that did best at the highest fidelity reached, on all the data
        top = max(ctx.trials, key=lambda r: (_fidelity(r), r["scores"]["fitness"]))
        cand = top["candidate"]
        ctx.evaluate([cand["genome"] if isinstance(cand, dict) else cand], tag="final",
                     limit_budget=False)
        completed = 1
    ctx.notes.update({"completed": completed, "pruned": pruned,
                      "fidelities": [round(f, 4) for f in fidelities]})


def _fidelity(record: dict[str, Any]) -> float:
    cand = record["candidate"]
    return float(cand.get("fidelity", 1.0)) if isinstance(cand, dict) else 1.0
