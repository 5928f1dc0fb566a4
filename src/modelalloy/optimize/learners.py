"""The coefficient learners on a built-in suite, and their ``modelalloy optimize`` entries.

``learn_*`` give each learner (modelalloy.optimize.adamerging, expert_merging,
self_positioning, sens_merging) the suite's model and data the way its paper uses them — the
same functions make the rows of ``benchmarks/informed_rows.py`` (via
:func:`modelalloy.eval.informed.run_informed`) and the ``optimize`` runs:

==================  ========================================================================
adamerging          entropy of each task's head on its unlabeled ``test`` inputs
expert_merging      a few unlabeled ``val`` samples per task (batches of one)
sens_merging        labeled ``val`` examples (sensitivities and logit distances)
self_positioning    cross-entropy on the labeled ``val`` split
==================  ========================================================================

``run_*`` (the ``optimize`` entries) read the experts of the template (each must be one of the
suite's expert folders, so its task — and head — is known), learn, and score the learned
task-arithmetic recipe once on the objective: that is the run's one trial and its recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import OptimizeError
from modelalloy.optimize.adamerging import CoefficientResult

StateDict = Mapping[str, torch.Tensor]


def _eval() -> Any:
    import modelalloy.eval.informed as informed

    return informed


def learn_adamerging(suite: Any, tasks: Sequence[str], base: StateDict,
                     experts: Sequence[StateDict], *, granularity: str = "layer",
                     steps: int = 500, lr: float = 1e-3, batch_size: int = 16,
                     init: float = 0.3, ties_density: float | None = None,
                     seed: int = 0) -> CoefficientResult:
    from modelalloy.optimize.adamerging import adamerging

    ev = _eval()
    batches = ev.task_batches(suite, tasks, "test", batch_size)
    return adamerging(ev.suite_module(suite, base, tasks), base, experts, batches,
                      granularity=granularity, steps=steps, lr=lr, init=init,
                      ties_density=ties_density, seed=seed)


def learn_expert_merging(suite: Any, tasks: Sequence[str], base: StateDict,
                         experts: Sequence[StateDict], *, samples: int = 16,
                         split: str = "val", batch_size: int = 16, limit: int | None = None,
                         chunks: Mapping[str, int] | None = None) -> Any:
    """An :class:`ExpertMergingResult` with the suite body's tensor names."""
    from modelalloy.optimize.expert_merging import ExpertMergingResult, expert_merging
    from modelalloy.stats.hooks import batch_size_of, select_example

    ev = _eval()
    model = ev.suite_module(suite, base, tasks, stacked=True)
    batches = ev.task_batches(suite, tasks, split, batch_size, limit=limit)
    per_task = [[select_example(b, i, batch_size_of(b)) for b in bs
                 for i in range(batch_size_of(b))][:samples] for bs in batches]
    res = expert_merging(model, ev.to_module_names(model, base),
                         [ev.to_module_names(model, sd) for sd in experts], per_task,
                         chunks=None if chunks is None else ev.to_module_names(model, chunks))
    return ExpertMergingResult(ev.to_body_names(model, res.alphas), res.history, list(base))


def learn_sens_merging(suite: Any, tasks: Sequence[str], base: StateDict,
                       experts: Sequence[StateDict], *, scale: float = 1.0,
                       temperature: float = 1.0, limit: int = 32, split: str = "val",
                       batch_size: int = 16) -> tuple[CoefficientResult, dict[str, Any]]:
    from modelalloy.optimize.sens_merging import sens_merging

    ev = _eval()
    calib = ev.task_batches(suite, tasks, split, batch_size, limit=limit, labels=True)
    return sens_merging(ev.suite_module(suite, base, tasks), base, experts, calib,
                        scale=scale, temperature=temperature)


def learn_self_positioning(suite: Any, tasks: Sequence[str], base: StateDict,
                           experts: Sequence[StateDict], *, steps: int = 300,
                           lr: float = 5e-3, mu: float = 0.05, split: str = "val",
                           batch_size: int = 16, seed: int = 0) -> CoefficientResult:
    from modelalloy.optimize.self_positioning import self_positioning

    ev = _eval()
    probe = [b for bs in ev.task_batches(suite, tasks, split, batch_size, labels=True)
             for b in bs]

    def ce(forward: Callable[[Any], Any], batch: dict[str, Any]) -> torch.Tensor:
        return ev.supervised_loss(forward({k: v for k, v in batch.items() if k != "labels"}),
                                  batch)

    return self_positioning(ev.suite_module(suite, base, tasks), base, experts, probe, ce,
                            steps=steps, lr=lr, mu=mu, seed=seed)


# -- modelalloy optimize entries ------------------------------------------------------------


def _inputs(ctx: Any, held_out: bool = False
            ) -> tuple[Any, list[str], StateDict, list[StateDict]]:
    """The suite, the task of each expert of the template, and the state dicts (``held_out``:
    the experts of held-out tasks may be in the template too)."""
    obj = ctx.objectives.suite(ctx.algorithm)
    suite = obj.suite
    if not ctx.template.uses_base():
        raise OptimizeError(f"{ctx.space.source}: {ctx.algorithm} learns task-arithmetic "
                            "coefficients: the template needs a base_model and a method that "
                            "uses it (task_arithmetic)")
    allowed = [t.name for t in suite.info.tasks] if held_out else suite.info.merged_tasks
    by_path = {str(suite.info.expert_dir(t).resolve()): t for t in allowed}
    tasks = []
    for entry in ctx.template.expert_entries():
        path = str(ctx.template.model_path(entry.model))
        if path not in by_path:
            raise OptimizeError(f"{ctx.space.source}: model {entry.model} is not one of the "
                                f"merged experts of {obj.spec} ({suite.info.path}); a learner "
                                "needs each expert's task (modelalloy optimize --template)")
        tasks.append(by_path[path])
    base, experts = ctx.pool.sources(ctx.template)
    return suite, tasks, base, experts


def _granularity(ctx: Any, allowed: Sequence[str]) -> str:
    if ctx.space.granularity not in allowed:
        raise OptimizeError(f"{ctx.space.source}: {ctx.algorithm} learns "
                            f"{' or '.join(allowed)}-wise coefficients, not "
                            f"search.granularity '{ctx.space.granularity}'")
    return ctx.space.granularity


def _finish(ctx: Any, res: CoefficientResult, notes: dict[str, Any] | None = None) -> None:
    """Score the learned recipe (the run's trial) and draw its coefficients."""
    absolute = [str(ctx.template.model_path(e.model)) for e in ctx.template.expert_entries()]
    recipe = res.to_recipe(str(ctx.template.model_path(ctx.template.base_model)), absolute)
    recipe["seed"] = ctx.template.seed
    if res.history:
        ctx.notes["loss"] = [round(res.history[0], 6), round(res.history[-1], 6)]
    ctx.notes["coefficients"] = [round(float(res.coefficients.min()), 4),
                                 round(float(res.coefficients.max()), 4)]
    ctx.notes.update(notes or {})
    ctx.evaluate([recipe], limit_budget=False, tag=res.method)
    res.save_heatmap(ctx.out / "coefficients.png", [Path(m).name for m in absolute])
    res.save_json(ctx.out / "coefficients.json")


def _opt(ctx: Any, key: str, default: Any) -> Any:
    value = ctx.options.get(key)
    return default if value is None else value


def run_adamerging(ctx: Any) -> None:
    suite, tasks, base, experts = _inputs(ctx)
    density = ctx.options.get("ties_density")
    res = learn_adamerging(suite, tasks, base, experts,
                           granularity=_granularity(ctx, ("task", "layer")), steps=ctx.budget,
                           lr=float(_opt(ctx, "lr", 1e-3)),
                           batch_size=int(ctx.options["batch_size"]),
                           init=float(ctx.options["init"]),
                           ties_density=None if density is None else float(density),
                           seed=ctx.seed)
    _finish(ctx, res)


def run_expert_merging(ctx: Any) -> None:
    _granularity(ctx, ("layer",))
    suite, tasks, base, experts = _inputs(ctx)
    res = learn_expert_merging(suite, tasks, base, experts,
                               samples=int(ctx.options["samples"]))
    _finish(ctx, res.to_coefficients())


def run_self_positioning(ctx: Any) -> None:
    _granularity(ctx, ("task",))
    suite, tasks, base, experts = _inputs(ctx)
    res = learn_self_positioning(suite, tasks, base, experts, steps=ctx.budget,
                                 lr=float(_opt(ctx, "lr", 5e-3)),
                                 mu=float(ctx.options["mu"]),
                                 batch_size=int(ctx.options["batch_size"]), seed=ctx.seed)
    _finish(ctx, res)


def run_sens_merging(ctx: Any) -> None:
    _granularity(ctx, ("layer",))
    suite, tasks, base, experts = _inputs(ctx)
    res, info = learn_sens_merging(suite, tasks, base, experts,
                                   scale=float(ctx.options["scale"]),
                                   temperature=float(ctx.options["temperature"]),
                                   limit=int(ctx.options["limit"]))
    _finish(ctx, res, {"k_sigma": [round(info["k_sigma_min"], 4),
                                   round(info["k_sigma_max"], 4)],
                       **({"warning": info["warning"]} if "warning" in info else {})})


def run_expert_merging_pp(ctx: Any) -> None:
    """Expert Merging++: a layer-wise run, chunk counts m_l by importance (budget B = the
    number of layer-wise coefficients per task unless ``chunk_budget``), a chunk-wise run.

    Chunk-wise coefficients are not a recipe parameter: they are written as ``merge_coeffs``
    statistics under ``OUT/stats/<task>/`` and the recipe is ``chunk_task_arithmetic``, which
    reads them from each expert's ``stats/`` folder (copy them there to merge).
    """
    from modelalloy.optimize.candidate import merge_candidate
    from modelalloy.optimize.expert_merging import allocate_chunks
    from modelalloy.recipe.load import recipe_from_dict
    from modelalloy.stats import save_stats

    _granularity(ctx, ("layer",))
    suite, tasks, base, experts = _inputs(ctx)
    samples = int(ctx.options["samples"])
    layer = learn_expert_merging(suite, tasks, base, experts, samples=samples)
    budget = ctx.options.get("chunk_budget") or len(layer.alphas)
    chunks = allocate_chunks(layer, base, experts, budget=float(budget))
    res = learn_expert_merging(suite, tasks, base, experts, samples=samples, chunks=chunks)
    stats = res.to_statistics()
    for task, st in zip(tasks, stats, strict=True):
        save_stats(st, ctx.out / "stats" / task / "merge_coeffs.safetensors", "merge_coeffs")
    recipe = {"merge_method": "chunk_task_arithmetic",
              "base_model": str(ctx.template.model_path(ctx.template.base_model)),
              "models": [{"model": str(ctx.template.model_path(e.model))}
                         for e in ctx.template.expert_entries()],
              "dtype": "float32", "seed": ctx.template.seed}
    ctx.notes["chunks"] = {n: m for n, m in chunks.items() if m != 1}
    ctx.notes["merge_coeffs"] = f"{ctx.out / 'stats'}/<task>/merge_coeffs.safetensors"
    rec = recipe_from_dict(recipe, source=str(ctx.out / "recipe.yaml"), base_dir=ctx.out)
    ctx.record(recipe, lambda: ctx.objectives.score(merge_candidate(
        rec, ctx.pool, stats={"merge_coeffs": [dict(st) for st in stats]})),
        tag="expert_merging_pp")
