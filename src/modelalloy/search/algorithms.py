"""The optimizers ``modelalloy optimize`` runs: name, kind, paper, options, where the code is.

A *search* proposes candidates (genomes of the template's search space) and is told their
scores through :meth:`modelalloy.search.driver.RunContext.evaluate`; a *learner* learns
coefficients by gradients on a suite's data and has its result scored once. Modules are
imported only when their algorithm runs (Ray, cma, optuna and pymoo are optional).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelalloy.errors import OptimizeError


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    kind: str                                   # "search" or "learner"
    paper: str
    summary: str
    entry: str                                  # "module:function" taking a RunContext
    options: dict[str, tuple[Any, str]] = field(default_factory=dict)
    budget: int = 100                           # default --budget (trials; learners: steps)
    needs: tuple[str, ...] = ()                 # optional packages (the [search] extra)
    budget_entry: str | None = None             # "module:function(space, options)" default

    def default_budget(self, space: Any, options: dict[str, Any]) -> int:
        if self.budget_entry is None:
            return self.budget
        module, _, fn = self.budget_entry.partition(":")
        return int(getattr(importlib.import_module(module), fn)(space, options))

    def runner(self) -> Callable[[Any], None]:
        for pkg in self.needs:
            try:
                importlib.import_module(pkg)
            except ImportError:
                raise OptimizeError(f"algorithm '{self.name}' needs the '{pkg}' package: pip "
                                    "install 'modelalloy[search]'") from None
        module, _, fn = self.entry.partition(":")
        return getattr(importlib.import_module(module), fn)

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = [k for k in given if k not in self.options]
        if unknown:
            known = ", ".join(self.options) or "none"
            raise OptimizeError(f"algorithm '{self.name}': unknown option '{unknown[0]}'; "
                                f"options: {known}")
        return {k: given.get(k, default) for k, (default, _help) in self.options.items()}


_LEARNER_OPTIONS: dict[str, tuple[Any, str]] = {
    "batch_size": (16, "examples per batch"),
    "lr": (None, "learning rate (the paper's when unset)"),
}

ALGORITHMS: dict[str, AlgorithmSpec] = {s.name: s for s in [
    AlgorithmSpec(
        "evolve", "search",
        "Akiba et al., Evolutionary Optimization of Model Merging Recipes, Nature Machine "
        "Intelligence 2025 (Sakana); mergekit-evolve",
        "CMA-ES over the template's genome (layer groups × parameter sets × models × "
        "(weight, density)) or, with search.space dataflow, over a layer path through the "
        "models and its input factors; fitness Σ w·score",
        "modelalloy.optimize.evolve:run",
        {"sigma0": (1 / 6, "CMA-ES step size in unit coordinates (mergekit-evolve: 1/6)"),
         "popsize": (None, "population (CMA default 4 + ⌊3 ln n⌋)"),
         "restarts": (9, "IPOP restarts (population ×2 each) when CMA stops, while budget "
                         "is left"),
         "patience": (None, "also restart after this many generations without a better "
                            "fitness"),
         "ps_budget": (None, "search.space ps+dfs: trials of the parameter-space phase "
                             "(default half the budget; the data-flow phase gets the rest)")},
        budget=100, needs=("cma",)),
    AlgorithmSpec(
        "map", "search",
        "Li et al., MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic "
        "Approximation, ICLR 2025",
        "quadratic surrogate per task from (d+1)(d+2) designed merges, NSGA-III front on the "
        "surrogates, preference picks the recipe",
        "modelalloy.optimize.map_variants:run",
        {"points": (None, "designed points (default (d+1)(d+2); nested: 20 per round)"),
         "preference": (None, "weights over the scores (default equal)"),
         "warp": ("auto", "sigmoid, none, or auto (sigmoid for scores in [0, 1])"),
         "population": (100, "NSGA-III population"),
         "generations": (25, "NSGA-III generations"),
         "reevaluate": (5, "front points scored for real (the chosen one first)"),
         "variant": ("plain", "plain, bayesian (adaptive sampling where the surrogates "
                              "err) or nested (pairwise rounds, for many tasks)"),
         "tasks": (None, "nested: the metric of each model, in model order"),
         "schedule": (None, "bayesian: designed points, then new points per metric and "
                            "round (default (d+1)(d+2),3,3)")},
        budget=0, needs=("pymoo", "scipy"),
        budget_entry="modelalloy.optimize.map_search:default_budget"),
    AlgorithmSpec(
        "layerwise_search", "search",
        "Yang et al., MedSAMix: A Training-Free Model Merging Approach for Medical Image "
        "Segmentation, AAAI 2026",
        "zero-order search (Optuna TPE) over per-layer-group parameters with successive "
        "halving on growing shares of the data",
        "modelalloy.optimize.layerwise_search:run",
        {"reduction_factor": (3, "successive halving's η"),
         "rungs": (3, "fidelities η^-(R-1) .. 1"),
         "startup": (10, "random trials before TPE"),
         "batch": (4, "configurations proposed and scored together")},
        budget=100, needs=("optuna",)),
    AlgorithmSpec(
        "fw_merging", "learner",
        "Chen et al., FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization, 2025",
        "Frank-Wolfe over the pool of models (hard: task arithmetic as the move; soft: "
        "AdaMerging as the move), task or layer granularity; the budget is the iterations",
        "modelalloy.search.runs:run_fw_merging",
        {"step_size": (0.1, "γ_t = step_size · 2/(t+2)"),
         "scaling": (0.3, "task-arithmetic scaling s of the start and of each move"),
         "init": ("ta", "start: ta (task arithmetic at s) or base"),
         "limit": (100, "labeled val examples per task (suite objectives)"),
         "batch_size": (32, "examples per batch"),
         "variant": ("hard", "hard or soft"),
         "ada_steps": (500, "soft: AdaMerging steps per iteration")},
        budget=10),
    AlgorithmSpec(
        "adamerging", "learner",
        "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
        "task- or layer-wise task-arithmetic coefficients by entropy minimisation on the "
        "suite's unlabeled test inputs",
        "modelalloy.search.runs:run_adamerging",
        {**_LEARNER_OPTIONS, "init": (0.3, "initial coefficient"),
         "ties_density": (None, "AdaMerging++: TIES-trim the task vectors first (0.2)")},
        budget=500),
    AlgorithmSpec(
        "expert_merging", "learner",
        "Zhang et al., Expert Merging: Model Merging with Unsupervised Expert Alignment and "
        "Importance-Guided Layer Chunking, ICLR 2026",
        "layer-wise coefficients aligning hidden states and logits with each expert on a few "
        "unlabeled samples",
        "modelalloy.search.runs:run_expert_merging",
        {"samples": (16, "unlabeled samples per task")}, budget=1),
    AlgorithmSpec(
        "expert_merging_pp", "learner",
        "Zhang et al., Expert Merging++ (importance-guided chunks), ICLR 2026",
        "Expert Merging, then chunk counts by importance and a chunk-wise run",
        "modelalloy.search.runs:run_expert_merging_pp",
        {"samples": (16, "unlabeled samples per task"),
         "chunk_budget": (None, "total chunks B (default 2 × tensors)")}, budget=1),
    AlgorithmSpec(
        "self_positioning", "learner",
        "Li et al., Improving General Text Embedding Model: Tackling Task Conflict and Data "
        "Imbalance through Model Merging, arXiv 2410.15035",
        "task-wise coefficients of an iterative SLERP of the task vectors, by gradient descent "
        "on the labeled val split",
        "modelalloy.search.runs:run_self_positioning",
        {**_LEARNER_OPTIONS, "mu": (0.05, "penalty on λ")}, budget=300),
    AlgorithmSpec(
        "sens_merging", "learner",
        "Liu et al., Sens-Merging: Sensitivity-Guided Parameter Balancing for Merging Large "
        "Language Models, Findings of ACL 2025",
        "layer-wise coefficients from parameter sensitivities and cross-task logit distances",
        "modelalloy.search.runs:run_sens_merging",
        {"limit": (32, "labeled val examples per task"),
         "scale": (None, "λ, task arithmetic's coefficient (unset: the best of 0.1–1.0 on "
                         "the validation split)"),
         "temperature": (1.0, "softmax temperature T")}, budget=1),
]}


def get_algorithm(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise OptimizeError(f"unknown algorithm '{name}'; available: {', '.join(ALGORITHMS)} "
                            "(`modelalloy optimize --list` describes them)")
    return ALGORITHMS[name]
