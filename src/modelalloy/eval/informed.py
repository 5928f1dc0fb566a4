"""Data-informed merging on a built-in suite: collect each method's statistics on the suite's
own data, merge, score.

This module is the glue that runs data-informed methods on a suite.
:class:`~modelalloy.eval.suite_stats.BenchStats` makes the statistics a registry method declares
(Grams, RegMean++ Grams, Fishers, activations, Adam moments) on either kind of suite; the
harness (:func:`modelalloy.eval.harness.run_bench`, so ``modelalloy bench`` and ``make demo``)
uses it for every such method, and :func:`run_informed` uses it for its rows (with its own
split and limits, not cached).
Everything goes through the library's own, architecture-agnostic code paths —
``modelalloy.stats`` hooks for Grams, Fishers and activations, ``load_adam_moments`` for OTA,
the ``modelalloy.optimize`` learners for coefficients, and ``merge_state_dicts(..., stats=...)``
for the merge — on a plain torch module built from the suite: the suite's body plus its
per-task heads (:class:`SuiteModule`).

Data used (``stats_split``, default the labeled ``val`` split, whose labels only Sens-Merging and
Self-Positioning read; AdaMerging uses the unlabeled ``test`` inputs, as in the paper):

====================  ===========================================================================
``regmean``           input Grams of every linear map of expert k on task k's inputs; the suite's
                      convolutions have no Gram and are averaged (as the reference code does for
                      every non-Linear tensor)
``regmean_pp``        the same, collected through the already-merged earlier layers
``fisher``            diagonal Fisher of expert k (its body + task k's frozen head) on task k's
                      inputs, exact expectation over the 10 classes (the reference default)
``ota`` / ``ota_ffg``  Adam second moments saved with each expert's fine-tuning run; ``ota_ffg``
                      first grafts each expert with Fast Fisher Grafting (density 0.4)
``aim``               the base model's input activations on every task, relaxing a
                      task-arithmetic or TIES merge
``adamerging``        task-wise and layer-wise coefficients, entropy of each task's head on its
                      unlabeled test inputs
``expert_merging``    layer-wise coefficients aligning hidden states and logits with the experts
``sens_merging``      sensitivity-guided layer-wise coefficients
``self_positioning``  task-wise coefficients by SGD on a labeled probe set (the val split)
====================  ===========================================================================

LM suites (tiny-lm) use the language model itself (no heads), prompt batches
``{"input_ids", "attention_mask"}`` (plus answer ``labels`` where a method needs them) and the
sampled Fisher; the rest is the same code.

The suite body has no stack of numbered blocks (RegMean++ and Expert Merging walk one), so
:class:`~modelalloy.eval.suite_stats.SuiteModule` can present the body's top-level children
as ``layers.0 .. layers.N-1``; :func:`~modelalloy.eval.suite_stats.to_body_names` maps the
statistics and coefficients back to the body's own names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelalloy.api import merge_state_dicts
from modelalloy.eval.harness import (
    SuiteScorer,
    is_relaxation,
    merge_experts,
    method_skip_reason,
    paper_settings,
    run_bench,
    summarize,
)
from modelalloy.eval.suite_stats import (
    BenchStats,
    BenchStatsConfig,
    is_lm_suite,
    layout_overrides,
    suite_module,
    task_batches,
    to_body_names,
    to_module_names,
)
from modelalloy.optimize.adamerging import CoefficientResult

# Rows beside the registry's data-informed methods: OTA after Fast Fisher Grafting (two registry
# methods in a row) and the coefficient learners (modelalloy.optimize), which are not methods.
OTA_FFG = "ota_ffg"
LEARNER_ROWS = ("adamerging_task", "adamerging_layer", "expert_merging", "sens_merging",
                "self_positioning")
# A relaxation method (AIM) relaxes each of these merges; its rows are named after them.
RELAXED_MERGES = ("task_arithmetic", "ties")
BASELINES = ("linear", "task_arithmetic", "ties")
StateDict = Mapping[str, torch.Tensor]


def supervised_loss(output: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Cross-entropy against ``batch["labels"]``: per example for classifier logits, next-token
    (shifted, -100 ignored) for sequence logits."""
    from modelalloy.stats.hooks import logits_of

    logits = logits_of(output).float()
    labels = batch["labels"]
    if logits.dim() == 3:
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           labels[:, 1:].reshape(-1), ignore_index=-100)
    return nn.functional.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------
# The coefficient learners on a suite: each given the suite's model and data the way its paper
# uses them (AdaMerging: unlabeled test inputs; Expert Merging: a few unlabeled val samples;
# Sens-Merging and Self Positioning: labeled val examples). The rows below and `modelalloy
# optimize` (modelalloy.search.runs) both call these.


def learn_adamerging(suite: Any, tasks: Sequence[str], base: StateDict,
                     experts: Sequence[StateDict], *, granularity: str = "layer",
                     steps: int = 500, lr: float = 1e-3, batch_size: int = 16,
                     init: float = 0.3, ties_density: float | None = None,
                     seed: int = 0) -> CoefficientResult:
    from modelalloy.optimize.adamerging import adamerging

    batches = task_batches(suite, tasks, "test", batch_size)
    return adamerging(suite_module(suite, base, tasks), base, experts, batches,
                      granularity=granularity, steps=steps, lr=lr, init=init,
                      ties_density=ties_density, seed=seed)


def learn_expert_merging(suite: Any, tasks: Sequence[str], base: StateDict,
                         experts: Sequence[StateDict], *, samples: int = 16,
                         split: str = "val", batch_size: int = 16, limit: int | None = None,
                         chunks: Mapping[str, int] | None = None) -> Any:
    """An :class:`ExpertMergingResult` with the suite body's tensor names."""
    from modelalloy.optimize.expert_merging import ExpertMergingResult, expert_merging
    from modelalloy.stats.hooks import batch_size_of, select_example

    model = suite_module(suite, base, tasks, stacked=True)
    batches = task_batches(suite, tasks, split, batch_size, limit=limit)
    per_task = [[select_example(b, i, batch_size_of(b)) for b in bs
                 for i in range(batch_size_of(b))][:samples] for bs in batches]
    res = expert_merging(model, to_module_names(model, base),
                         [to_module_names(model, sd) for sd in experts], per_task,
                         chunks=None if chunks is None else to_module_names(model, chunks))
    return ExpertMergingResult(to_body_names(model, res.alphas), res.history, list(base))


def learn_sens_merging(suite: Any, tasks: Sequence[str], base: StateDict,
                       experts: Sequence[StateDict], *, scale: float = 1.0,
                       temperature: float = 1.0, limit: int = 32, split: str = "val",
                       batch_size: int = 16) -> tuple[CoefficientResult, dict[str, Any]]:
    from modelalloy.optimize.sens_merging import sens_merging

    calib = task_batches(suite, tasks, split, batch_size, limit=limit, labels=True)
    return sens_merging(suite_module(suite, base, tasks), base, experts, calib,
                        scale=scale, temperature=temperature)


def learn_self_positioning(suite: Any, tasks: Sequence[str], base: StateDict,
                           experts: Sequence[StateDict], *, steps: int = 300,
                           lr: float = 5e-3, mu: float = 0.05, split: str = "val",
                           batch_size: int = 16, seed: int = 0) -> CoefficientResult:
    from modelalloy.optimize.self_positioning import self_positioning

    probe = [b for bs in task_batches(suite, tasks, split, batch_size, labels=True)
             for b in bs]

    def ce(forward: Callable[[Any], Any], batch: dict[str, Any]) -> torch.Tensor:
        return supervised_loss(forward({k: v for k, v in batch.items() if k != "labels"}),
                                  batch)

    return self_positioning(suite_module(suite, base, tasks), base, experts, probe, ce,
                            steps=steps, lr=lr, mu=mu, seed=seed)


# ---------------------------------------------------------------------------------------------
# Coefficients -> weights


def apply_coefficients(result: Any, base: Mapping[str, torch.Tensor],
                       experts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """θ = θ₀ + Σ_k c_{row(n), k} τ_k for the result's tensors, θ₀ elsewhere (what the
    ``task_arithmetic`` recipe of ``result.to_recipe`` computes)."""
    out = {n: t.clone() for n, t in base.items()}
    for name in result.names:
        t = base[name].float().clone()
        for k, sd in enumerate(experts):
            t += result.weight_of(name, k) * (sd[name].float() - base[name].float())
        out[name] = t.to(base[name].dtype)
    return out


def merge_through_recipe(result: Any, suite: Any, tasks: Sequence[str],
                         out_dir: Any) -> dict[str, torch.Tensor]:
    """Write the learned coefficients as a recipe (``out_dir/recipe.yaml``) over the suite's
    model folders and run it through the engine (``modelalloy.merge`` reading those folders,
    in memory: the bits of the merge written to disk); returns the merged state dict."""
    from pathlib import Path

    from modelalloy.api import merge

    recipe = result.save_recipe(Path(out_dir) / "recipe.yaml", str(suite.info.base_dir),
                                [str(suite.info.expert_dir(t)) for t in tasks])
    return merge(recipe)


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass
class InformedConfig:
    """What the rows use. Defaults are the papers' where the suite allows (see the docs)."""

    stats_split: str = "val"
    stats_limit: int | None = None        # examples per task for Grams / Fishers / activations
    batch_size: int = 16                  # AdaMerging's reference batch size
    # Per registry method, parameters over its paper settings (spec.facts.paper_settings:
    # RegMean's α 0.95, the reference CLIP-ViT config) and its defaults (AIM's ω 0.4, FFG's
    # density 0.4, used by the ota_ffg row).
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    fisher_mode: str = "exact"            # the reference's expectation over classes
    fisher_limit: int | None = 64         # examples per task for the Fisher
    adamerging_steps: int = 500
    adamerging_lr: float = 1e-3
    expert_samples: int = 16              # unlabeled samples per domain (batches of one)
    sens_limit: int = 32
    sens_scale: float | None = None       # λ of Sens-Merging; None: task arithmetic's tuned λ
    self_positioning_steps: int = 300
    seed: int = 0
    methods: tuple[str, ...] | None = None  # rows to run (None: informed_methods())


@dataclass
class InformedResult:
    suite: str
    size: str
    records: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.records)


def informed_specs(n_experts: int) -> list[Any]:
    """The registry's data-informed methods a suite of ``n_experts`` can run: those that declare
    statistics the suite's collectors make (:class:`BenchStats`) and merge that many experts
    (or relax one merge toward the base, AIM)."""
    from modelalloy.methods import list_methods

    return [spec for spec in list_methods()
            if spec.stats and method_skip_reason(spec, n_experts, stats=True) is None]


def informed_methods(n_experts: int = 2) -> tuple[str, ...]:
    """Every row :func:`run_informed` can run: the registry's data-informed methods
    (:func:`informed_specs`; AIM's rows are named after the merges it relaxes), OTA after Fast
    Fisher Grafting, and the coefficient learners."""
    return (*(spec.name for spec in informed_specs(n_experts)), OTA_FFG, *LEARNER_ROWS)


def _tvs_scale_param(tuning: Mapping[str, Any], method: str, default: float) -> float:
    return float(tuning.get(method, {}).get("chosen", default))


def run_informed(suite: Any, config: InformedConfig | None = None, *,
                 baselines: Sequence[str] = BASELINES,
                 log: Callable[[str], None] | None = None) -> InformedResult:
    """Baseline rows from the harness, then one row per data-informed method."""
    from modelalloy.methods import get_method

    cfg = config or InformedConfig()
    log = log or (lambda _m: None)
    torch.manual_seed(cfg.seed)
    info = suite.info
    tasks = info.merged_tasks
    bench = run_bench(suite, list(baselines), tune=True, seed=cfg.seed, log=log)
    records = list(bench.records)
    result = InformedResult(info.name, info.size, records, dict(bench.timings), {},
                            dict(bench.tuning))
    scorer = SuiteScorer(suite)
    base = suite.base_state_dict()
    experts = [suite.expert_state_dict(t) for t in tasks]
    wanted = set(cfg.methods or informed_methods(len(experts)))
    # Grams, Fishers, activations and Adam moments: the same collection code as the harness
    # (BenchStats), on this config's split and limits, not cached on disk.
    provider = BenchStats(suite, tasks, base, experts, BenchStatsConfig(
        unlabeled_split=cfg.stats_split, fisher_split=cfg.stats_split, limit=cfg.stats_limit,
        fisher_limit=cfg.fisher_limit, fisher_mode=cfg.fisher_mode, batch_size=cfg.batch_size,
        seed=cfg.seed, cache=False), log=log)

    def row(method: str, merged: Mapping[str, torch.Tensor], params: dict[str, Any],
            start: float, variant: str = "informed") -> None:
        result.timings[method] = round(time.perf_counter() - start, 2)
        records.extend(scorer.records(method, dict(merged), variant=variant, params=params))
        acc = [r["accuracy"] for r in records[-len(info.tasks):]
               if not r["held_out"]]
        log(f"{method}: held-in accuracy {sum(acc) / len(acc):.3f} "
            f"({result.timings[method]:.1f}s)")

    def want(name: str) -> bool:
        return name in wanted

    # --- The registry's data-informed methods, each with its statistics from the provider
    for spec in informed_specs(len(experts)):
        if not want(spec.name):
            continue
        given = {**paper_settings(spec), **cfg.params.get(spec.name, {})}
        note: dict[str, Any] = {}
        if "fisher" in spec.stats:
            # the exact expectation needs (batch, classes) outputs; LMs sample one token per
            # position
            note = {"mode": "sampled" if is_lm_suite(suite) else cfg.fisher_mode,
                    "examples": cfg.fisher_limit}
        t0 = time.perf_counter()
        if is_relaxation(spec):
            # relax the (tuned) task-arithmetic and TIES merges with the base's statistics
            stats = provider.for_method(spec, spec.resolve(1, given, spec.name))
            for under in RELAXED_MERGES:
                lam = _tvs_scale_param(result.tuning, under, 1.0)
                start = time.perf_counter()
                merged_under = merge_experts(get_method(under), base, experts, {"lambda": lam},
                                             cfg.seed)
                relaxed = merge_state_dicts(spec.name, base, [merged_under], stats=stats,
                                            **{**layout_overrides(spec, stats), **given})
                row(f"{spec.name}({under})", relaxed, {**given, **note, "lambda": lam},
                    t0 if under == RELAXED_MERGES[0] else start)
        else:
            stats = provider.for_method(spec, spec.resolve(len(experts), given, spec.name))
            merged = merge_state_dicts(spec.name, None if spec.base == "none" else base,
                                       experts, stats=stats,
                                       **{**layout_overrides(spec, stats), **given})
            row(spec.name, merged, {**given, **note}, t0)
        for kind, per_owner in stats.items():
            result.extra[f"{spec.name}_{kind}_layers"] = sorted(per_owner[0].keys())

    # --- OTA after Fast Fisher Grafting: each expert grafted onto the base, then OTA
    if want(OTA_FFG):
        t0 = time.perf_counter()
        moments = provider.get("exp_avg_sq")
        ffg = {**paper_settings("ffg"), **cfg.params.get("ffg", {})}
        grafted = [merge_state_dicts("ffg", base, [sd], stats={"exp_avg_sq": [v]}, **ffg)
                   for sd, v in zip(experts, moments, strict=True)]
        ota = {**paper_settings("ota"), **cfg.params.get("ota", {})}
        merged = merge_state_dicts("ota", base, grafted, stats={"exp_avg_sq": moments}, **ota)
        density = get_method("ffg").resolve(len(experts), ffg, "ffg")["density"]
        row(OTA_FFG, merged, {"density": density, **ffg, **ota}, t0)

    # --- AdaMerging: entropy of each task's head on its unlabeled test inputs
    if want("adamerging_task") or want("adamerging_layer"):

        for gran in ("task", "layer"):
            if not want(f"adamerging_{gran}"):
                continue
            t0 = time.perf_counter()
            res = learn_adamerging(suite, tasks, base, experts, granularity=gran,
                                   steps=cfg.adamerging_steps, lr=cfg.adamerging_lr,
                                   batch_size=cfg.batch_size, seed=cfg.seed)
            result.extra[f"adamerging_{gran}"] = res
            result.notes[f"adamerging_{gran}"] = (
                f"summed entropy {res.history[0]:.3f} → {res.history[-1]:.3f}, coefficients in "
                f"[{float(res.coefficients.min()):.2f}, {float(res.coefficients.max()):.2f}]")
            row(f"adamerging_{gran}", apply_coefficients(res, base, experts),
                {"granularity": gran, "steps": cfg.adamerging_steps,
                 "entropy": [round(res.history[0], 4), round(res.history[-1], 4)]}, t0)

    # --- Expert Merging (layer-wise): align with each expert's hidden states and logits
    if want("expert_merging"):

        t0 = time.perf_counter()
        coeffs = learn_expert_merging(suite, tasks, base, experts, samples=cfg.expert_samples,
                                      split=cfg.stats_split, batch_size=cfg.batch_size,
                                      limit=cfg.stats_limit).to_coefficients()
        result.extra["expert_merging"] = coeffs
        row("expert_merging", apply_coefficients(coeffs, base, experts),
            {"samples": cfg.expert_samples}, t0)

    # --- Sens-Merging: sensitivity-guided layer-wise coefficients (labeled calibration)
    if want("sens_merging"):

        t0 = time.perf_counter()
        scale = (cfg.sens_scale if cfg.sens_scale is not None
                 else _tvs_scale_param(result.tuning, "task_arithmetic", 1.0))
        res, diag = learn_sens_merging(suite, tasks, base, experts, scale=scale,
                                       limit=cfg.sens_limit, split=cfg.stats_split,
                                       batch_size=cfg.batch_size)
        result.notes["sens_merging"] = (f"λ = {scale} (task arithmetic's tuned λ), K·σ in "
                                        f"[{diag['k_sigma_min']:.3f}, "
                                        f"{diag['k_sigma_max']:.3f}]")
        row("sens_merging", apply_coefficients(res, base, experts),
            {"lambda": scale,
             "k_sigma": [round(diag["k_sigma_min"], 3), round(diag["k_sigma_max"], 3)]}, t0)

    # --- Self Positioning: task-wise coefficients by SGD on the labeled val split
    if want("self_positioning"):

        t0 = time.perf_counter()
        res = learn_self_positioning(suite, tasks, base, experts,
                                     steps=cfg.self_positioning_steps, split=cfg.stats_split,
                                     batch_size=cfg.batch_size, seed=cfg.seed)
        row("self_positioning", apply_coefficients(res, base, experts),
            {"steps": cfg.self_positioning_steps,
             "weights": [round(float(c), 3) for c in res.coefficients[0]]}, t0)
    return result
