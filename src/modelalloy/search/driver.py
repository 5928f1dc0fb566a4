"""``modelalloy optimize``: run one algorithm on a template and an objective, write OUT.

OUT gets ``recipe.yaml`` (the chosen candidate as a plain recipe, absolute model paths, that
``modelalloy merge`` reproduces bit for bit), ``trials.jsonl``, ``state.json`` (for
``--resume``), ``progress.png`` and ``coefficients.png`` (the chosen values per cell and model),
and ``summary.md`` (the table the command prints).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelalloy.errors import OptimizeError
from modelalloy.optimize.candidate import ModelPool
from modelalloy.optimize.space import SearchSpace, StagedRecipe
from modelalloy.optimize.template import load_template
from modelalloy.optimize.trials import TrialLog
from modelalloy.recipe.model import Recipe
from modelalloy.search.algorithms import AlgorithmSpec, get_algorithm
from modelalloy.search.objectives import Objectives
from modelalloy.search.workers import Candidate, TrialFailed, make_evaluator


class _Progress(AbstractContextManager):
    """A rich progress bar: trials done, best fitness, ETA (silent when not shown)."""

    def __init__(self, show: bool, total: int, label: str) -> None:
        self.show, self.total, self.label = show, total, label
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
                                 TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, best="—")
        return self

    def update(self, done: int, best: float | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done,
                             best="—" if best is None else f"{best:.4g}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


@dataclass
class RunContext:
    """What an algorithm sees: the space, the objectives, the models, and :meth:`evaluate`."""

    algorithm: str
    space: SearchSpace
    template: Recipe
    objectives: Objectives
    pool: ModelPool
    out: Path
    budget: int
    seed: int
    options: dict[str, Any]
    log: TrialLog
    evaluator: Any
    progress: _Progress
    notes: dict[str, Any] = field(default_factory=dict)
    chosen: int | None = None   # the trial to write as recipe.yaml (default: best fitness)
    eval_seconds: float = 0.0   # wall time spent scoring candidates (the workers' share)
    echo: Callable[[str], None] = lambda _m: None

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.log.records

    @property
    def remaining(self) -> int:
        return max(0, self.budget - len(self.log.records))

    def best(self) -> dict[str, Any] | None:
        """The best trial scored on all the data (multi-fidelity trials at a lower fidelity
        do not count)."""
        full = [r for r in self.log.records if not (isinstance(r["candidate"], Mapping) and
                                                    r["candidate"].get("fidelity", 1.0) < 1.0)]
        return max(full, key=lambda r: r["scores"]["fitness"], default=None)

    def evaluate(self, candidates: Sequence[Candidate], *, tag: str | None = None,
                 limit_budget: bool = True) -> list[dict[str, Any]]:
        """Score candidates in order (at most the remaining budget unless told otherwise);
        returns their trial records. A resumed run reads the logged ones back."""
        cands = list(candidates)[:self.remaining] if limit_budget else list(candidates)
        records: list[dict[str, Any]] = []
        new: list[tuple[int, Candidate]] = []
        start = len(self.log.records)
        for offset, cand in enumerate(cands):
            index = start + offset
            old = self.log.replayed(index)
            payload = _payload(cand)
            if old is not None:
                if old.get("candidate") != payload:
                    raise OptimizeError(f"{self.out}: trial {index} of the log is not the one "
                                        "this run proposes; the run is not the same (or not "
                                        "deterministic): start it in a new folder, "
                                        "out=NEW_FOLDER", options=("out",))
                records.append(old)
            else:
                new.append((index, cand))
        for rec in records:
            self.log.append(rec, replay=True)
        if new:
            start_eval = time.perf_counter()
            try:
                results = self.evaluator.evaluate([c for _, c in new])
                failure = None
            except TrialFailed as err:
                results, failure = err.done, err
            self.eval_seconds += time.perf_counter() - start_eval
            for (index, cand), (scores, seconds) in zip(new, results, strict=False):
                rec = {"trial": index, "candidate": _payload(cand), "scores": scores,
                       "seconds": round(seconds, 4), **({"tag": tag} if tag else {})}
                self.log.append(rec)
                records.append(rec)
            if failure is not None:
                index = new[failure.index][0]
                self.log.write_state(finished=False)
                raise OptimizeError(
                    f"objective {', '.join(self.objectives.specs)} failed on trial {index}: "
                    f"{failure.message}; the {len(self.log.records)} trials before it are kept "
                    f"in {self.log.path} (fix it and rerun with resume=True)",
                    options=("resume",))
        best = self.best()
        self.progress.update(len(self.log.records),
                             None if best is None else best["scores"]["fitness"])
        return records


    def record(self, candidate: Mapping[str, Any],
               score: Callable[[], dict[str, float]], *, tag: str | None = None
               ) -> dict[str, Any]:
        """One trial scored here by ``score()`` rather than by the workers (a candidate that is
        not a plain recipe, e.g. chunk-wise coefficients); replayed like the others."""
        index = len(self.log.records)
        old = self.log.replayed(index)
        if old is not None and old.get("candidate") == _payload(candidate):
            self.log.append(old, replay=True)
            return old
        start = time.perf_counter()
        try:
            scores = score()
        except Exception as err:
            raise OptimizeError(f"objective {', '.join(self.objectives.specs)} failed on trial "
                                f"{index}: {type(err).__name__}: {err}") from err
        rec = {"trial": index, "candidate": _payload(candidate), "scores": scores,
               "seconds": round(time.perf_counter() - start, 4), **({"tag": tag} if tag else {})}
        self.log.append(rec)
        self.progress.update(len(self.log.records), scores["fitness"])
        return rec


def _payload(cand: Candidate) -> Any:
    """The JSON form of a candidate (floats round-trip exactly)."""
    import json

    if isinstance(cand, Mapping):
        return json.loads(json.dumps(dict(cand)))
    return [float(x) for x in cand]


@dataclass
class OptimizeResult:
    algorithm: str
    out: Path
    recipe_path: Path
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    notes: dict[str, Any]
    seconds: float
    eval_seconds: float = 0.0   # of which scoring candidates (in parallel on Ray workers)


def optimize(algorithm: str, recipe: str | Path, objectives: Sequence[str], out: str | Path, *,
             weights: Sequence[float] | None = None, budget: int | None = None,
             workers: int = 1, ray_address: str | None = None, seed: int = 0,
             resume: bool = False, options: Mapping[str, Any] | None = None,
             progress: bool = False, echo: Callable[[str], None] | None = None,
             in_place: bool = True) -> OptimizeResult:
    """Run ``algorithm`` on the template ``recipe`` against ``objectives``; write ``out``.

    The Python form of ``modelalloy optimize`` (same arguments; ``options`` are the
    algorithm's own, e.g. ``{"popsize": 8}``). Returns the chosen trial and every trial.
    ``in_place=False`` scores every candidate as a merged state dict loaded into a model, not
    merged into a live one (the same scores, slower: for comparisons).
    """
    spec = get_algorithm(algorithm)
    run = spec.runner()
    opts = spec.resolve_options(dict(options or {}))
    objs = Objectives.parse(list(objectives), weights)
    objs.in_place = in_place
    space, template = load_template(recipe)
    budget = spec.default_budget(space, opts) if budget is None else int(budget)
    if budget < 1:
        raise OptimizeError(f"budget={budget}: must be at least 1", options=("budget",))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptimizeError(f"out='{out}': is a file; give a folder", options=("out",))
    config = {"algorithm": algorithm, "seed": seed, "template": space.template,
              "search": [space.granularity, space.layers_per_group, space.filters,
                         [vars(b) for b in space.bounds]],
              "objectives": objs.specs, "weights": objs.weights, "options": opts}
    if getattr(space, "methods", None):  # a method per cell (only then: older keys unchanged)
        config["search"].append({"methods": list(space.methods)})
    if hasattr(space, "config_extra"):  # PS then DFS: the data-flow phase's settings
        config["search"].append(space.config_extra())
    allowed = getattr(space, "algorithms", None)
    if allowed is not None and algorithm not in allowed:
        raise OptimizeError(f"{space.source}: search.space {space.name} is searched by "
                            f"{', '.join(allowed)}, not '{algorithm}'")
    log = TrialLog(out, config, resume)
    echo = echo or (lambda _m: None)
    start = time.perf_counter()
    objs.bind(template.model_path(template.base_model if template.uses_base()
                                  else template.expert_entries()[0].model))
    objs.prepare()
    pool = ModelPool()
    pool.sources(template)  # every model read once, here, before any worker starts
    evaluator = None
    try:
        evaluator = make_evaluator(space, objs, pool, workers, ray_address)
        with _Progress(progress, budget if spec.kind == "search" else 1,
                       f"{algorithm}") as bar:
            ctx = RunContext(algorithm, space, template, objs, pool, out, budget, seed, opts,
                             log, evaluator, bar, echo=echo)
            run(ctx)
        if not ctx.trials:
            raise OptimizeError(f"{algorithm}: no trial was run (budget {budget})")
        chosen = ctx.trials[ctx.chosen] if ctx.chosen is not None else ctx.best()
        if chosen is None:
            raise OptimizeError(f"{algorithm}: no trial was scored on all the data; give more "
                                f"than budget={budget}", options=("budget",))
        recipe_path = write_outputs(ctx, spec, chosen)
        log.write_state(finished=True, chosen=chosen["trial"], notes=ctx.notes)
    finally:
        log.close()
        if evaluator is not None:
            evaluator.close()
    return OptimizeResult(algorithm, out, recipe_path, chosen, list(ctx.trials), ctx.notes,
                          time.perf_counter() - start, ctx.eval_seconds)


def chosen_recipe(ctx: RunContext, record: Mapping[str, Any]) -> Recipe | StagedRecipe:
    """The recipe of a trial, with absolute model paths and a name saying where it came from
    (a staged one, run by ``modelalloy merge-multi``, when the cells use several methods)."""
    from modelalloy.recipe.load import recipe_from_dict

    cand = record["candidate"]
    extra: dict[str, Any] = {}  # what a candidate adds to its genome (PS then DFS: "ps")
    if isinstance(cand, Mapping) and "genome" in cand:
        extra = {k: v for k, v in cand.items() if k not in ("genome", "fidelity")}
        cand = cand["genome"]
    name = (f"{ctx.algorithm} trial {record['trial']} (fitness "
            f"{record['scores']['fitness']:.4g})")
    absolute = {m: ctx.template.model_reference(m) for m in ctx.template.all_models()}
    if isinstance(cand, Mapping):
        data = dict(cand)
        data["name"] = name
    else:
        staged = getattr(ctx.space, "staged_dicts", lambda *a, **k: None)(
            cand, absolute=absolute, **extra)
        if staged is not None:  # a method per cell: mergekit-multi stages, unnamed final
            where = str(ctx.out / "recipe.yaml")
            return StagedRecipe([(n, recipe_from_dict({**d, "name": n}, source=where,
                                                      base_dir=ctx.out))
                                 for n, d in staged[0]],
                                recipe_from_dict(staged[1], source=where, base_dir=ctx.out),
                                comment=name)
        data = ctx.space.recipe_dict(cand, absolute=absolute, name=name, **extra)
    return recipe_from_dict(data, source=str(ctx.out / "recipe.yaml"), base_dir=ctx.out)


def write_outputs(ctx: RunContext, spec: AlgorithmSpec, chosen: Mapping[str, Any]) -> Path:
    from modelalloy.optimize.report import plot_coefficients, plot_progress, summary_markdown
    from modelalloy.optimize.trials import write_json_atomic

    recipe = chosen_recipe(ctx, chosen)
    path = ctx.out / "recipe.yaml"
    tmp = ctx.out / ".recipe.yaml.tmp"
    tmp.write_text(recipe.to_yaml())
    tmp.replace(path)
    plot_progress(ctx.trials, ctx.out / "progress.png", f"{ctx.algorithm}: fitness per trial")
    genome = chosen["candidate"]
    space = getattr(ctx.space, "space_of", lambda _c: ctx.space)(genome)
    if isinstance(genome, Mapping):
        genome = genome.get("genome")
    if genome is not None:
        plot_coefficients(space, genome, ctx.out / "coefficients.png")
    (ctx.out / "summary.md").write_text(summary_markdown(ctx, chosen))
    if ctx.notes:
        write_json_atomic(ctx.out / "notes.json", ctx.notes)
    return path
