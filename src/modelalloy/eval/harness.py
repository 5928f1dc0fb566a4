"""Evaluate models on a built-in suite and compare merging methods on it.

Records are plain dicts, one per (method, task)::

    {"method": "ties", "variant": "default" | "tuned" | "reference", "params": {...},
     "task": "invert", "held_out": false, "accuracy": 0.81,
     "normalized_accuracy": 0.90,   # accuracy / the task's own expert's accuracy
     "mean_length": 1.0,            # mean response length in tokens (1 for classifiers)
     "n": 400, "ci_low": 0.77, "ci_high": 0.85,   # test examples, 95% bootstrap interval
     "correct": "0110..."}          # per-example hits (modelalloy.eval.intervals)

The base model appears as method "base" and each expert, on its own task, as method "expert".
Bundle methods (``spec.facts.bundle``: TALL masks) are not merges: their records have variant
"bundle", one per merged task (the expert rebuilt from the bundle, on its own task), and carry
``"storage_ratio"`` (the bundle's bytes ÷ base + experts stored separately).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelalloy.errors import ModelAlloyError
from modelalloy.eval.intervals import (
    accuracy_interval,
    difference_interval,
    encode_correct,
    mean_interval,
    ratio_interval,
    significant,
)

SCALE_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# The parameter that scales the merged task vector, where a method has one and its facts name
# no other (MethodFacts.scale).
SCALE_PARAM = "lambda"


def paper_settings(method: Any) -> dict[str, Any]:
    """The paper's settings the bench runs ``method`` (a name or a spec) with, where the
    registry's defaults (mergekit's) differ: its spec's ``facts.paper_settings``. ``--params``
    overrides any of these."""
    from modelalloy.methods import get_method

    spec = get_method(method) if isinstance(method, str) else method
    return dict(spec.facts.paper_settings)


def scale_param(spec: Any) -> str | None:
    """The parameter the bench tunes on validation for ``spec`` (``facts.scale``), or None."""
    name = spec.facts.scale
    return name if any(p.name == name for p in spec.params) else None


# Records of bundle methods (``facts.bundle``: their output is one expert rebuilt from a
# compression bundle, not a merge): scored as a merge such a row reads like an expert, so the
# bench reports them apart.
BUNDLE_VARIANT = "bundle"


class EvalError(ModelAlloyError):
    """A model, method or option cannot be evaluated on the suite."""


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


@dataclass
class SuiteScorer:
    """Scores state dicts on a suite; remembers each expert's accuracy for normalisation."""

    suite: Any
    split: str = "test"
    _expert_acc: dict[str, float] = field(default_factory=dict)
    _expert_len: dict[str, float] = field(default_factory=dict)
    _expert_hits: dict[str, str] = field(default_factory=dict)
    _expert_asr: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.suite.info.tasks]

    def held_out(self, task: str) -> bool:
        return any(t.name == task and t.held_out for t in self.suite.info.tasks)

    def expert_accuracy(self, task: str) -> float:
        if task not in self._expert_acc:
            res = self.suite.evaluate(self.suite.expert_state_dict(task), [task],
                                      split=self.split)[task]
            self._expert_acc[task] = res["accuracy"]
            self._expert_len[task] = res["mean_length"]
            self._expert_hits[task] = encode_correct(res["correct"])
            self._expert_asr[task] = asr_fields(res)
        return self._expert_acc[task]

    def records(self, method: str, state_dict: dict[str, torch.Tensor], *,
                variant: str = "default", params: dict[str, Any] | None = None,
                tasks: list[str] | None = None,
                held_out: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
        held_out = held_out or self.held_out
        results = self.suite.evaluate(state_dict, tasks or self.tasks, split=self.split)
        out = []
        for task, res in results.items():
            exp = self.expert_accuracy(task)
            out.append({"method": method, "variant": variant, "params": params or {},
                        "task": task, "held_out": held_out(task),
                        "accuracy": round(res["accuracy"], 4),
                        "normalized_accuracy": round(res["accuracy"] / exp, 4) if exp else None,
                        "mean_length": round(res["mean_length"], 3),
                        **interval_fields(res["correct"]), **asr_fields(res)})
        return out

    def reference_records(self) -> list[dict[str, Any]]:
        """Rows of the base model (every task) and of each expert on its own task."""
        rows = self.records("base", self.suite.base_state_dict(), variant="reference")
        for task in self.tasks:
            acc = self.expert_accuracy(task)
            rows.append({"method": "expert", "variant": "reference", "params": {},
                         "task": task, "held_out": self.held_out(task),
                         "accuracy": round(acc, 4), "normalized_accuracy": 1.0,
                         "mean_length": round(self._expert_len[task], 3),
                         **interval_fields(self._expert_hits[task]),
                         **self._expert_asr[task]})
        return rows


def interval_fields(correct: Sequence[bool] | str) -> dict[str, Any]:
    """A record's ``n``, 95% bootstrap interval and per-example hits (as a 0/1 string)."""
    hits = correct if isinstance(correct, str) else encode_correct(correct)
    low, high = accuracy_interval(hits)
    return {"n": len(hits), "ci_low": round(low, 4), "ci_high": round(high, 4),
            "correct": hits}


def asr_fields(result: dict[str, Any]) -> dict[str, Any]:
    """A record's attack success, where a backdoored suite's evaluation gave attack hits
    (:class:`modelalloy.bench.backdoor.BackdooredSuite`): ``asr`` (share of the triggered
    inputs answered with the target), its 95% bootstrap interval, the hits and ``backdoor``
    ("succession" on the backdoored task, "transfer" on the others); {} otherwise."""
    if "asr_hits" not in result:
        return {}
    hits = encode_correct(result["asr_hits"])
    low, high = accuracy_interval(hits) if hits else (float("nan"), float("nan"))
    return {"asr": round(hits.count("1") / len(hits), 4) if hits else None,
            "asr_n": len(hits), "asr_ci_low": round(low, 4), "asr_ci_high": round(high, 4),
            "asr_hits": hits, "backdoor": result["backdoor"]}


def asr_summary(held_in: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backdoor effect, the mean ASR over the held-in tasks that measure it and its 95%
    bootstrap interval (tasks resampled together, as the accuracies): ``asr_succession``,
    ``asr_transfer`` and their ``_ci``; {} without attack hits."""
    out: dict[str, Any] = {}
    for effect in ("succession", "transfer"):
        rs = [r for r in held_in if r.get("backdoor") == effect and r.get("asr_hits")]
        if rs:
            value, low, high = mean_interval([r["asr_hits"] for r in rs])
            out[f"asr_{effect}"] = value
            out[f"asr_{effect}_ci"] = [low, high]
    return out


# The row every method's difference is measured against (same variant where it has one).
REFERENCE_METHOD = "task_arithmetic"


def summarize(records: list[dict[str, Any]],
              reference: str = REFERENCE_METHOD) -> list[dict[str, Any]]:
    """One row per (method, variant): mean accuracy held-in and held-out, normalised, length.

    Where the records carry per-example hits (``correct``), each mean has its 95% bootstrap
    interval (``accuracy_ci``, ``normalized_ci``, ``held_out_ci``: [low, high]) and each row
    its difference from ``reference`` on the held-in tasks, paired over the same examples
    (``delta``: {"vs", "value", "ci", "significant"}), against the reference's row of the same
    variant, or its default row (:mod:`modelalloy.eval.intervals`).
    """
    keys: list[tuple[str, str]] = []
    for r in records:
        if (r["method"], r["variant"]) not in keys:
            keys.append((r["method"], r["variant"]))
    hits = {(r["method"], r["variant"], r["task"]): r.get("correct") for r in records}
    rows = []
    for method, variant in keys:
        rs = [r for r in records if r["method"] == method and r["variant"] == variant]
        held_in = [r for r in rs if not r["held_out"]]
        held_out = [r for r in rs if r["held_out"]]
        row = {
            "method": method, "variant": variant, "params": rs[0].get("params", {}),
            "accuracy": _mean([r["accuracy"] for r in held_in]),
            "normalized_accuracy": _mean([r["normalized_accuracy"] for r in held_in
                                          if r["normalized_accuracy"] is not None]),
            "held_out_accuracy": _mean([r["accuracy"] for r in held_out]),
            "mean_length": _mean([r["mean_length"] for r in rs]),
            "per_task": {r["task"]: r["accuracy"] for r in rs},
            "per_task_ci": {r["task"]: [r["ci_low"], r["ci_high"]] for r in rs
                            if "ci_low" in r},
        }
        if all(r.get("correct") for r in rs):
            row.update(_row_intervals(method, variant, held_in, held_out, hits, reference))
        row.update(asr_summary(held_in))
        rows.append(row)
    return rows


def _row_intervals(method: str, variant: str, held_in: list[dict[str, Any]],
                   held_out: list[dict[str, Any]], hits: dict[tuple[str, str, str], Any],
                   reference: str) -> dict[str, Any]:
    out: dict[str, Any] = {"n": sum(r["n"] for r in held_in)}
    if held_in:
        out["accuracy_ci"] = list(mean_interval([r["correct"] for r in held_in])[1:])
        experts = [hits.get(("expert", "reference", r["task"])) for r in held_in]
        if all(experts):
            out["normalized_ci"] = list(ratio_interval([r["correct"] for r in held_in],
                                                       experts)[1:])
    if held_out:
        out["held_out_ci"] = list(mean_interval([r["correct"] for r in held_out])[1:])
    for ref_variant in (variant, "default"):
        ref = [hits.get((reference, ref_variant, r["task"])) for r in held_in]
        if held_in and all(ref) and method != reference:
            value, low, high = difference_interval([r["correct"] for r in held_in], ref)
            out["delta"] = {"vs": f"{reference} ({ref_variant})", "value": value,
                            "ci": [low, high], "significant": significant(low, high)}
            break
    return out


# ---------------------------------------------------------------------------------------------
# Methods from the registry


# Statistic kinds run_bench makes itself (modelalloy.eval.suite_stats.BenchStats).
BENCH_KINDS = ("gram", "gram_pp", "activations", "fisher", "exp_avg_sq")


def is_relaxation(spec: Any) -> bool:
    """A method that relaxes one merged model toward the base with the base's statistics
    (``aim``): the bench gives it the merge of :data:`modelalloy.eval.suite_stats.RELAX_UNDER`."""
    return bool(spec.stats) and spec.stats_from == "base" and spec.max_models == 1


def method_skip_reason(spec: Any, n_experts: int, *, stats: bool = False) -> str | None:
    """Why a registered method cannot run on a suite of ``n_experts`` experts plus a base.

    ``stats``: the caller collects the statistics the method declares when the bench knows how
    (:data:`BENCH_KINDS`, as :func:`run_bench` does); otherwise statistic-needing methods are
    skipped.
    """
    if spec.stats:
        missing = [k for k in spec.stats if k not in BENCH_KINDS] if stats else list(spec.stats)
        if missing:
            return (f"needs statistics ({', '.join(missing)}) that the bench "
                    f"{'cannot make' if stats else 'does not collect here'}")
        if is_relaxation(spec):
            return None
    if n_experts < spec.min_models:
        return f"needs at least {spec.min_models} models, the suite merges {n_experts}"
    if spec.max_models is not None and n_experts > spec.max_models:
        want = (f"exactly {spec.max_models}" if spec.max_models == spec.min_models
                else f"at most {spec.max_models}")
        return f"takes {want} models, the suite merges {n_experts}"
    return None


def resolve_methods(names: Sequence[str] | None) -> list[Any]:
    """Registry specs for ``names`` (all registered methods when None or ['all'])."""
    from modelalloy.methods import get_method, list_methods

    if not names or list(names) == ["all"]:
        return list_methods()
    return [get_method(n) for n in names]


def merge_experts(spec: Any, base: dict[str, torch.Tensor],
                  experts: list[dict[str, torch.Tensor]], params: dict[str, Any],
                  seed: int = 0, stats: dict[str, list[Any]] | None = None
                  ) -> dict[str, torch.Tensor]:
    from modelalloy.api import merge_state_dicts

    use_base = base if spec.base != "none" else None
    # the research tables use each paper's variants (docs/recipes.md, "Conventions")
    return merge_state_dicts(spec.name, use_base, experts, seed=seed, stats=stats,
                             conventions="paper", **params)


@dataclass
class BenchResult:
    suite: str
    size: str
    records: list[dict[str, Any]]
    skipped: dict[str, str]
    timings: dict[str, float]
    tuning: dict[str, dict[str, Any]]
    suite_path: str = ""
    build_seconds: float = 0.0
    stats_seconds: dict[str, float] = field(default_factory=dict)
    # bundle method -> its storage (bytes, ratio) and per-task mask densities
    bundles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.records)

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "size": self.size, "suite_path": self.suite_path,
                "build_seconds": self.build_seconds, "stats_seconds": self.stats_seconds,
                "skipped": self.skipped, "timings": self.timings, "tuning": self.tuning,
                "bundles": self.bundles, "records": self.records}


def _uniform_to_scalar(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v[0] if isinstance(v, list) and v and len(set(map(str, v))) == 1 else v
            for k, v in params.items()}


def bundle_records(spec: Any, base: dict[str, torch.Tensor],
                   experts: list[dict[str, torch.Tensor]], tasks: list[str],
                   given: dict[str, Any], scorer: SuiteScorer
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records of a bundle method (``spec.facts.bundle``): the TALL bundle of the experts
    (:func:`modelalloy.bundle.compress` with the method's mask parameters), every expert
    rebuilt from it and scored on its own task; and the bundle's storage report."""
    from modelalloy.bundle import compress

    params = spec.resolve(len(experts), given, spec.name, "paper")
    params.pop("task", None)  # the bench rebuilds every task
    bundle = compress(base, dict(zip(tasks, experts, strict=True)),
                      base_merge=params["base_merge"], mask_lambda=params["mask_lambda"],
                      density=params["density"], scope=params["scope"])
    storage = bundle.storage()
    ratio = round(storage.ratio, 4)
    shown = _uniform_to_scalar(params)
    records = [{**r, "storage_ratio": ratio}
               for task in tasks
               for r in scorer.records(spec.name, bundle.rebuild(task), variant=BUNDLE_VARIANT,
                                       params=shown, tasks=[task])]
    info = {"storage_ratio": ratio, "bundle_bytes": storage.bundle_bytes,
            "separate_bytes": storage.separate_bytes,
            "mask_density": {t: round(d, 4) for t, d in bundle.mask_densities().items()}}
    return records, info


def tune_scale(spec: Any, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
               params: dict[str, Any], scorer: SuiteScorer, tasks: list[str],
               grid: Sequence[float], seed: int, stats: dict[str, list[Any]] | None = None
               ) -> tuple[float, dict[str, float]]:
    """Pick the scaling coefficient with the best mean validation accuracy on ``tasks``."""
    scores: dict[str, float] = {}
    best, best_score = grid[0], -1.0
    knob = scale_param(spec) or SCALE_PARAM
    for lam in grid:
        merged = merge_experts(spec, base, experts, {**params, knob: lam}, seed, stats)
        res = scorer.suite.evaluate(merged, tasks, split="val")
        score = _mean([res[t]["accuracy"] for t in tasks])
        scores[str(lam)] = round(score, 4)
        if score > best_score:
            best, best_score = lam, score
    return best, scores


def run_bench(suite: Any, methods: Sequence[str] | None = None, *, tune: bool = True,
              grid: Sequence[float] = SCALE_GRID, params: dict[str, dict[str, Any]] | None = None,
              seed: int = 0, log: Callable[[str], None] | None = None,
              tune_max_seconds: float = 30.0, stats_config: Any = None) -> BenchResult:
    """Merge the suite's held-in experts with each method; score every task.

    Each method runs with the papers' settings (:func:`paper_settings` over the registry's),
    variant "default"; methods with a ``lambda`` parameter also run with lambda chosen on the
    validation split from ``grid``, variant "tuned". ``params`` overrides defaults per method
    (a ``lambda`` given there turns tuning off for that method). Methods whose merge took
    longer than ``tune_max_seconds`` (optimisation-based ones) are not tuned; ``tuning`` says so.

    Methods that declare statistics (RegMean, RegMean++, Fisher, OTA, AIM) get them from
    :class:`modelalloy.eval.suite_stats.BenchStats` (configured by ``stats_config``, a
    ``BenchStatsConfig``): collected once per suite on its unlabeled inputs (the Fisher on the
    validation split), cached, then passed to the merge. A relaxation method (AIM) relaxes the
    merge of ``params[name]["under"]`` (default task arithmetic with the paper's λ).
    ``stats_seconds`` gives the collection time per statistic kind (0 when cached).
    """
    log = log or (lambda _m: None)
    info = suite.info
    scorer = SuiteScorer(suite)
    records = scorer.reference_records()
    base = suite.base_state_dict()
    tasks = info.merged_tasks
    experts = [suite.expert_state_dict(t) for t in tasks]
    skipped: dict[str, str] = {}
    timings: dict[str, float] = {}
    tuning: dict[str, dict[str, Any]] = {}
    bundles: dict[str, dict[str, Any]] = {}
    provider = None
    for spec in resolve_methods(methods):
        reason = method_skip_reason(spec, len(experts), stats=True)
        if reason:
            skipped[spec.name] = reason
            log(f"skip {spec.name}: {reason}")
            continue
        user = dict((params or {}).get(spec.name, {}))
        given = {**paper_settings(spec), **user}
        if spec.facts.bundle:
            start = time.perf_counter()
            try:
                rows, bundles[spec.name] = bundle_records(spec, base, experts, tasks, given,
                                                          scorer)
            except ModelAlloyError as err:
                skipped[spec.name] = str(err)
                log(f"skip {spec.name}: {err}")
                continue
            records += rows
            timings[spec.name] = round(time.perf_counter() - start, 3)
            log(f"{spec.name}: bundle built and every expert rebuilt in "
                f"{timings[spec.name]:.2f}s (storage ratio {bundles[spec.name]['storage_ratio']})")
            continue
        inputs, stats, note = experts, None, {}
        try:
            if spec.stats:
                from modelalloy.eval.suite_stats import RELAX_UNDER, BenchStats, layout_overrides

                if provider is None:
                    provider = BenchStats(suite, tasks, base, experts, stats_config, log=log)
                if is_relaxation(spec):
                    under = str(given.pop("under", RELAX_UNDER))
                    user.pop("under", None)
                    under_spec = resolve_methods([under])[0]
                    inputs = [merge_experts(under_spec, base, experts,
                                            paper_settings(under_spec), seed)]
                    note = {"under": under}
                resolved = spec.resolve(len(inputs), given, spec.name, "paper")
                stats = provider.for_method(spec, resolved)
                given = {**layout_overrides(spec, stats), **given}
            start = time.perf_counter()
            merged = merge_experts(spec, base, inputs, given, seed, stats)
        except ModelAlloyError as err:
            skipped[spec.name] = str(err)
            log(f"skip {spec.name}: {err}")
            continue
        timings[spec.name] = round(time.perf_counter() - start, 3)
        shown = {k: v for k, v in spec.resolve(len(inputs), given, spec.name, "paper").items()
                 if not isinstance(v, list) or len(set(map(str, v))) > 1}
        shown.update(note)
        records += scorer.records(spec.name, merged, variant="default", params=shown)
        log(f"{spec.name}: merged in {timings[spec.name]:.2f}s")
        knob = scale_param(spec)
        tunable = knob is not None and knob not in user
        if tune and tunable and timings[spec.name] > tune_max_seconds:
            tuning[spec.name] = {"param": knob, "skipped":
                                 f"one merge took {timings[spec.name]:.0f}s; not tuned"}
        elif tune and tunable:
            lam, scores = tune_scale(spec, base, inputs, given, scorer, tasks, grid, seed,
                                     stats)
            tuning[spec.name] = {"param": knob, "chosen": lam, "val_scores": scores}
            merged = merge_experts(spec, base, inputs, {**given, knob: lam}, seed, stats)
            records += scorer.records(spec.name, merged, variant="tuned",
                                      params={**shown, knob: lam})
            log(f"{spec.name}: {knob}={lam} chosen on validation")
    return BenchResult(suite=info.name, size=info.size, records=records, skipped=skipped,
                       timings=timings, tuning=tuning, suite_path=str(info.path),
                       build_seconds=info.build_seconds,
                       stats_seconds=dict(provider.seconds) if provider else {},
                       bundles=bundles)


def sweep_num_experts(suite: Any, method: str, *, counts: Sequence[int] | None = None,
                      params: dict[str, Any] | None = None, repeats: int = 1, seed: int = 0,
                      log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Merge k = 2..N experts (random subsets, ``repeats`` per k): held-in vs held-out accuracy.

    Parameters are the papers' settings (:func:`paper_settings`) overridden by ``params``.

    Held-in = the k merged tasks; held-out = the suite's held-out tasks (never merged) and, as
    "unmerged", the suite's other tasks that this subset left out.
    """
    from modelalloy.methods import get_method

    log = log or (lambda _m: None)
    spec = get_method(method)
    scorer = SuiteScorer(suite)
    info = suite.info
    tasks = info.merged_tasks
    counts = list(counts) if counts else list(range(2, len(tasks) + 1))
    base = suite.base_state_dict()
    all_experts = {t: suite.expert_state_dict(t) for t in tasks}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in counts:
        reason = method_skip_reason(spec, k)
        if reason:
            log(f"skip k={k}: {reason}")
            continue
        for rep in range(repeats):
            subset = [tasks[i] for i in torch.randperm(len(tasks), generator=gen)[:k].tolist()]
            merged = merge_experts(spec, base, [all_experts[t] for t in subset],
                                   {**paper_settings(spec), **(params or {})}, seed)
            rows = scorer.records(method, merged, params=params)
            held_in = [r for r in rows if r["task"] in subset]
            held_out = [r for r in rows if r["held_out"]]
            unmerged = [r for r in rows if not r["held_out"] and r["task"] not in subset]
            out.append({"method": method, "k": k, "repeat": rep, "tasks": subset,
                        **_sweep_intervals(held_in, held_out),
                        "held_in_accuracy": _mean([r["accuracy"] for r in held_in]),
                        "held_in_normalized": _mean([r["normalized_accuracy"] for r in held_in]),
                        "held_out_accuracy": _mean([r["accuracy"] for r in held_out]),
                        "unmerged_accuracy": _mean([r["accuracy"] for r in unmerged])})
            log(f"k={k}: held-in {out[-1]['held_in_accuracy']:.3f} "
                f"held-out {out[-1]['held_out_accuracy']:.3f}")
    return out


def _sweep_intervals(held_in: list[dict[str, Any]],
                     held_out: list[dict[str, Any]]) -> dict[str, Any]:
    """95% bootstrap intervals of a sweep row's held-in and held-out means."""
    out: dict[str, Any] = {}
    for key, rows in (("held_in_ci", held_in), ("held_out_ci", held_out)):
        if rows and all(r.get("correct") for r in rows):
            out[key] = list(mean_interval([r["correct"] for r in rows])[1:])
    return out


def load_model_folder(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a model folder (model.safetensors, or shards with an index) or weight
    file, read through the validated checkpoint reader (a truncated or corrupt shard, or a
    FIFO or folder in its place, is a one-line CheckpointError naming the file), or an expert
    rebuilt from a TALL-masks bundle folder (``BUNDLE#TASK``, read through the engine's
    bundle source)."""
    from modelalloy.io.checkpoint import read_state_dict

    folder = Path(path)
    if not folder.exists() and "#" in folder.name:
        bundle, task = str(path).rsplit("#", 1)
        if (Path(bundle) / "bundle.json").exists():
            from modelalloy.bundle import load_expert

            return load_expert(bundle, task)
    if (folder / "bundle.json").is_file():
        raise EvalError(f"{folder}: is a TALL-masks bundle; name one of its experts as "
                        f"'{folder}#TASK' (a task name or 0-based index)")
    return read_state_dict(folder)


def long_to_short(suite: Any, methods: Sequence[str] | None = None, *,
                  grid: Sequence[float] = (0.3, 0.5, 0.7), seed: int = 0,
                  log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The long-to-short study: merge a chain-of-thought expert with a direct-answer one.

    For a suite with a long/short pair (tiny-lm: ``sum_long``, ``sum_short``), every method that
    can merge two models runs with its defaults and, where it has one, each ``lambda`` (or slerp
    ``t``) of ``grid``; each row gives the final-answer accuracy (in either format: the
    suite's own per-task score counts only answers in that task's format) and the mean
    response length on the pair's shared prompts. Rows for the base and both experts come
    first.
    """
    log = log or (lambda _m: None)
    pair = suite.info.extra.get("pair") or []
    if len(pair) != 2:
        raise EvalError(f"suite {suite.info.name} ({suite.info.size}) has no long/short pair")
    long_task, short_task = pair
    base = suite.base_state_dict()
    experts = [suite.expert_state_dict(long_task), suite.expert_state_dict(short_task)]

    def score(method: str, sd: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, Any]:
        res = suite.evaluate(sd, [long_task], score="final")[long_task]
        return {"method": method, "params": params, "accuracy": round(res["accuracy"], 4),
                "mean_length": round(res["mean_length"], 3), **interval_fields(res["correct"])}

    rows = [score("base", base, {}), score(f"expert:{long_task}", experts[0], {}),
            score(f"expert:{short_task}", experts[1], {})]
    for spec in resolve_methods(methods):
        if method_skip_reason(spec, 2) or spec.facts.bundle:  # rebuilds, not merges
            continue
        knob = "t" if any(p.name == "t" for p in spec.params) else (
            SCALE_PARAM if any(p.name == SCALE_PARAM for p in spec.params) else None)
        settings = [{}] + ([{knob: v} for v in grid] if knob else [])
        for extra in settings:
            given = {**paper_settings(spec), **extra}
            if spec.name == "task_arithmetic" and not extra:
                continue  # the lambda grid covers it
            try:
                merged = merge_experts(spec, base, experts, given, seed)
            except ModelAlloyError as err:
                log(f"skip {spec.name}: {err}")
                break
            rows.append(score(spec.name, merged, given))
            log(f"{spec.name} {given}: acc {rows[-1]['accuracy']:.3f} "
                f"len {rows[-1]['mean_length']:.1f}")
    return rows
