"""The ``modelalloy optimize`` entries of the learners (and of FW-Merging, whose loss comes from
the objective): read the experts of the template (each must be one of the suite's expert
folders, so its task — and head — is known), learn with ``modelalloy.eval.informed.learn_*``
(the same functions as the informed benchmark rows), and score the learned task-arithmetic
recipe on the objective: that is the run's trial and its recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import OptimizeError
from modelalloy.eval.harness import SCALE_GRID
from modelalloy.eval.informed import (
    learn_adamerging,
    learn_expert_merging,
    learn_self_positioning,
    learn_sens_merging,
)
from modelalloy.optimize.adamerging import CoefficientResult
from modelalloy.optimize.fw_merging import Learn
from modelalloy.search.objectives import PythonObjective, SuiteObjective

StateDict = Mapping[str, torch.Tensor]


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
                                "needs each expert's task (a suite's template: "
                                "`modelalloy optimize --template suite:...`)")
        tasks.append(by_path[path])
    base, experts = ctx.pool.sources(ctx.template)
    return suite, tasks, base, experts


def _granularity(ctx: Any, allowed: Sequence[str]) -> str:
    if ctx.space.granularity not in allowed:
        raise OptimizeError(f"{ctx.space.source}: {ctx.algorithm} learns "
                            f"{' or '.join(allowed)}-wise coefficients, not "
                            f"search.granularity '{ctx.space.granularity}'")
    return ctx.space.granularity


def _expert_paths(ctx: Any) -> list[str]:
    return [ctx.template.model_reference(e.model) for e in ctx.template.expert_entries()]


def _learned_recipe(ctx: Any, res: CoefficientResult) -> dict[str, Any]:
    recipe = res.to_recipe(ctx.template.model_reference(ctx.template.base_model),
                           _expert_paths(ctx))
    recipe["seed"] = ctx.template.seed
    return recipe


def _draw(ctx: Any, res: CoefficientResult, notes: dict[str, Any] | None = None) -> None:
    """Note and draw the coefficients of the run's result."""
    if res.history:
        ctx.notes["loss"] = [round(res.history[0], 6), round(res.history[-1], 6)]
    ctx.notes["coefficients"] = [round(float(res.coefficients.min()), 4),
                                 round(float(res.coefficients.max()), 4)]
    ctx.notes.update(notes or {})
    res.save_heatmap(ctx.out / "coefficients.png", [Path(m).name for m in _expert_paths(ctx)])
    res.save_json(ctx.out / "coefficients.json")


def _finish(ctx: Any, res: CoefficientResult, notes: dict[str, Any] | None = None) -> None:
    """Score the learned recipe (the run's trial) and draw its coefficients."""
    ctx.evaluate([_learned_recipe(ctx, res)], limit_budget=False, tag=res.method)
    _draw(ctx, res, notes)


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
    """Sens-Merging's coefficients λ·K·σ_i^l. λ is task arithmetic's coefficient (the L2S
    paper's "coefficient in TA merging"): a given ``scale`` fixes it; unset, each λ of the
    benchmark's grid is a trial on the validation split and the best is kept, as the benchmark
    tunes task arithmetic. λ = 1 adds every expert's whole task vector, which for more than a
    few experts lands far from any of them."""
    _granularity(ctx, ("layer",))
    suite, tasks, base, experts = _inputs(ctx)
    given = ctx.options["scale"]
    grid = [float(given)] if given is not None else [float(lam) for lam in SCALE_GRID]
    unit, info = learn_sens_merging(suite, tasks, base, experts, scale=1.0,
                                    temperature=float(ctx.options["temperature"]),
                                    limit=int(ctx.options["limit"]))
    # K·σ does not depend on λ: the coefficients are λ times those of λ = 1
    scaled = [replace(unit, coefficients=unit.coefficients * lam) for lam in grid]
    records = ctx.evaluate([_learned_recipe(ctx, r) for r in scaled], limit_budget=False,
                           tag=unit.method)
    fitness = [rec["scores"]["fitness"] for rec in records]
    best = max(range(len(grid)), key=lambda i: (fitness[i], -i))
    notes: dict[str, Any] = {"k_sigma": [round(info["k_sigma_min"], 4),
                                         round(info["k_sigma_max"], 4)],
                             "lambda": grid[best]}
    if len(grid) > 1:
        notes["lambda_fitness"] = {str(lam): round(f, 6) for lam, f in zip(grid, fitness,
                                                                          strict=True)}
    if "warning" in info:
        notes["warning"] = info["warning"]
    _draw(ctx, scaled[best], notes)


def run_expert_merging_pp(ctx: Any) -> None:
    """Expert Merging++: a layer-wise run, chunk counts m_l by importance (budget B = the
    number of layer-wise coefficients per task unless ``chunk_budget``), a chunk-wise run.

    Chunk-wise coefficients vary inside a tensor, so the recipe is ``task_arithmetic_chunks``
    with each model's coefficients written per tensor (``chunks: [{filter: NAME, value: "a b
    c"}, ...]``, float32 values, exact in decimal): ``modelalloy merge DIR/recipe.yaml`` gives
    the scored weights bit for bit. They are also saved as ``merge_coeffs`` statistics under
    ``OUT/stats/<task>/`` (for ``chunk_task_arithmetic``, which reads them from each expert's
    ``stats/`` folder).
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
    names = [n for n, t in base.items() if t.is_floating_point()]
    recipe = {"merge_method": "task_arithmetic_chunks",
              "base_model": ctx.template.model_reference(ctx.template.base_model),
              "models": [{"model": ctx.template.model_reference(e.model),
                          "parameters": {"chunks": chunk_setting(res.alphas, k, names,
                                                                 ctx.space.source)}}
                         for k, e in enumerate(ctx.template.expert_entries())],
              "dtype": "float32", "seed": ctx.template.seed}
    ctx.notes["chunks"] = {n: m for n, m in chunks.items() if m != 1}
    ctx.notes["merge_coeffs"] = f"{ctx.out / 'stats'}/<task>/merge_coeffs.safetensors"
    rec = recipe_from_dict(recipe, source=str(ctx.out / "recipe.yaml"), base_dir=ctx.out)
    ctx.record(recipe, lambda: ctx.objectives.score(merge_candidate(rec, ctx.pool)),
               tag="expert_merging_pp")


def chunk_setting(alphas: Mapping[str, torch.Tensor], k: int, names: Sequence[str],
                  where: str) -> list[dict[str, Any]]:
    """Model k's chunk coefficients as per-tensor filter entries (longest name first, so the
    first match is the tensor itself; a tensor whose name holds a coefficient tensor's name
    gets its own empty entry), '' for the rest; checked under the first-match rule."""
    from modelalloy.recipe.model import Conditional, evaluate_setting

    target = {n: " ".join(repr(float(v)) for v in alphas[n][k].to(torch.float32).flatten())
              if n in alphas else "" for n in names}
    listed = [n for n in names if n in alphas or any(a in n for a in alphas if a != n)]
    entries: list[dict[str, Any]] = [{"filter": n, "value": target[n]}
                                     for n in sorted(listed, key=lambda n: (-len(n), n))]
    entries.append({"value": ""})
    conds = [Conditional(**e) for e in entries]
    if not all(evaluate_setting(n, conds) == v for n, v in target.items()):
        raise OptimizeError(f"{where}: the chunk coefficients cannot be written as filters")
    return entries


# -- FW-Merging: its loss from the objective -------------------------------------------


def suite_loss(obj: SuiteObjective, tasks: list[str], limit: int, batch_size: int
               ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Mean cross-entropy over every task's labeled val batches, through the suite module."""
    from torch.func import functional_call

    import modelalloy.eval.informed as ev

    suite = obj.suite
    batches = ev.task_batches(suite, tasks, "val", batch_size, limit=limit, labels=True)
    module = ev.suite_module(suite, suite.base_state_dict(), tasks)

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        total, count = torch.zeros(()), 0
        for bs in batches:
            for b in bs:
                inputs = {k: v for k, v in b.items() if k != "labels"}
                out = functional_call(module, params, args=(), kwargs=inputs, strict=False)
                total = total + ev.supervised_loss(out, b)
                count += 1
        return total / max(count, 1)

    return loss


def python_loss(obj: PythonObjective) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    fn = obj._load()

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        value = fn(params)
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            raise OptimizeError(f"fw_merging needs a differentiable objective: "
                                f"{obj.spec} must return a torch scalar of the state dict")
        return -value

    return loss


def run_fw_merging(ctx: Any) -> None:
    """FW-Merging (modelalloy.optimize.fw_merging) on the objective's loss."""
    from modelalloy.optimize.fw_merging import frank_wolfe, frank_wolfe_soft

    if ctx.space.granularity not in ("task", "layer"):
        raise OptimizeError(f"{ctx.space.source}: fw_merging moves task- or layer-wise, not "
                            f"search.granularity '{ctx.space.granularity}'")
    if not ctx.template.uses_base():
        raise OptimizeError(f"{ctx.space.source}: fw_merging writes task-arithmetic recipes: "
                            "the template needs a base_model (task_arithmetic)")
    base, pool = ctx.pool.sources(ctx.template)
    obj = ctx.objectives.items[0]
    opts = ctx.options
    soft = opts["variant"] == "soft"
    if opts["variant"] not in ("hard", "soft"):
        raise OptimizeError(f"fw_merging: variant '{opts['variant']}': use hard or soft")
    if isinstance(obj, SuiteObjective):
        _, tasks, _, _ = _inputs(ctx, held_out=True)
        # the loss is the merged tasks' (the proxy set); experts of held-out tasks in the
        # template are pool members that no task asks for (the paper's irrelevant models)
        relevant = [t for t in tasks if t in obj.suite.info.merged_tasks]
        loss = suite_loss(obj, relevant, int(opts["limit"]), int(opts["batch_size"]))
        if soft:
            task_losses = [suite_loss(obj, [t], int(opts["limit"]), int(opts["batch_size"]))
                           for t in relevant]
            learn = _adamerging_move(obj, relevant, ctx.space.granularity,
                                     int(opts["ada_steps"]), int(opts["batch_size"]), ctx.seed)
    elif soft:
        raise OptimizeError("fw_merging variant soft learns its moves with AdaMerging on a "
                            "suite's data: give a suite objective, "
                            "objectives=['suite:tiny-vision'] (or suite:tiny-lm)",
                            options=("objectives",))
    elif isinstance(obj, PythonObjective):
        loss = python_loss(obj)
    else:  # pragma: no cover - every objective kind is one of the two
        raise OptimizeError(f"fw_merging cannot differentiate {obj.spec}")
    names = [n for n, t in base.items() if t.is_floating_point()]
    absolute = [ctx.template.model_reference(e.model) for e in ctx.template.expert_entries()]
    base_path = ctx.template.model_reference(ctx.template.base_model)

    def as_result(c: torch.Tensor) -> CoefficientResult:
        if ctx.space.granularity == "task":  # every row is the same
            return CoefficientResult("fw_merging", "task", c[:1].float(), names,
                                     dict.fromkeys(names, 0), [], ["all tensors"], names)
        return CoefficientResult("fw_merging", "layer", c.float(), names,
                                 {n: i for i, n in enumerate(names)}, [], names, list(base))

    def score(t: int, c: torch.Tensor) -> None:
        recipe = as_result(c).to_recipe(base_path, absolute)
        recipe["seed"] = ctx.template.seed
        ctx.evaluate([recipe], limit_budget=False, tag=f"iterate {t}")

    if soft:
        c = frank_wolfe_soft(task_losses, base, pool, learn, iterations=ctx.budget,
                             scaling=float(opts["scaling"]), init=str(opts["init"]),
                             on_iterate=score)
    else:
        c = frank_wolfe(loss, base, pool, granularity=ctx.space.granularity,
                        iterations=ctx.budget, step_size=float(opts["step_size"]),
                        scaling=float(opts["scaling"]), init=str(opts["init"]),
                        on_iterate=score)
    ctx.chosen = ctx.trials[-1]["trial"]
    ctx.notes["iterations"] = len(ctx.trials) - 1
    ctx.notes["coefficients"] = [round(float(c.min()), 4), round(float(c.max()), 4)]
    as_result(c).save_heatmap(ctx.out / "coefficients.png", absolute)


def _adamerging_move(obj: SuiteObjective, tasks: list[str], granularity: str, steps: int,
                     batch_size: int, seed: int) -> Learn:
    """FW-soft's move: AdaMerging (entropy on each task's unlabeled test inputs) with the
    iterate as the base and the chosen vertices as the experts; λ per tensor and vertex."""
    import modelalloy.eval.informed as ev
    from modelalloy.optimize.adamerging import adamerging

    batches = ev.task_batches(obj.suite, tasks, "test", batch_size)

    def learn(x_t: dict[str, torch.Tensor], vertices: list[dict[str, torch.Tensor]],
              init: float) -> torch.Tensor:
        res = adamerging(ev.suite_module(obj.suite, x_t, tasks), x_t, vertices, batches,
                         granularity=granularity, steps=steps, init=init, seed=seed)
        return torch.tensor([[res.weight_of(n, j) if n in res.rows else 0.0
                              for j in range(len(vertices))] for n in x_t])

    return learn
