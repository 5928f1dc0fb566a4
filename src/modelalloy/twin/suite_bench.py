"""Twin-Merging on the built-in suites: router data, a routed module's scores, bench rows.

A routed model is a module, not a state dict, so it is scored here with the suites' own rules:
tiny-vision, each task's inputs through the model and that task's head (argmax accuracy);
tiny-lm, greedy decoding with the suite's ``greedy`` and exact match of the final answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from modelalloy.eval.harness import EvalError, SuiteScorer

METHOD = "twin_merging"


def router_data(suite: Any, tasks: list[str], split: str = "val", batch: int = 256
                ) -> dict[str, list[Any]]:
    """Each task's inputs of ``split`` as model batches (the router's training data)."""
    if suite.info.name == "tiny-lm":
        # right-padded prompts: the same masked-mean embedding as greedy's left-padded prefill
        # (positions count from each prompt's first token either way)
        from modelalloy.eval.suite_stats import task_batches

        return dict(zip(tasks, task_batches(suite, tasks, split, batch), strict=True))
    out: dict[str, list[Any]] = {}
    for task in tasks:
        inputs, _labels = suite.labeled(task, split)
        out[task] = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
    return out


@torch.no_grad()
def evaluate_module(suite: Any, model: Any, tasks: list[str] | None = None,
                    split: str = "test") -> dict[str, dict[str, float]]:
    """{task: {"accuracy", "mean_length"}} of a module (e.g. a TwinModel) on the suite."""
    tasks = tasks or [t.name for t in suite.info.tasks]
    out: dict[str, dict[str, float]] = {}
    if suite.info.name == "tiny-lm":
        from modelalloy.bench.lm import greedy, hits

        max_new = suite.info.config["n_positions"] - 16
        for task in tasks:
            prompts, answers = suite.labeled(task, split)
            gens = greedy(model, prompts, max_new)
            ok = hits(gens, answers)  # the suite's own score
            out[task] = {"accuracy": sum(ok) / len(ok),
                         "mean_length": sum(len(g) + 1 for g in gens) / len(gens)}
        return out
    if suite.info.name != "tiny-vision":
        raise EvalError(f"no module evaluation for suite {suite.info.name}")
    for task in tasks:
        x, y = suite.labeled(task, split)
        pred = suite.head(task)(model(x)).argmax(1)
        out[task] = {"accuracy": float((pred == y).float().mean()), "mean_length": 1.0}
    return out


def module_records(scorer: SuiteScorer, name: str, model: Any, *, variant: str = "default",
                   params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Records like :meth:`SuiteScorer.records`, for a module."""
    results = evaluate_module(scorer.suite, model, scorer.tasks, split=scorer.split)
    rows = []
    for task, res in results.items():
        exp = scorer.expert_accuracy(task)
        rows.append({"method": name, "variant": variant, "params": params or {},
                     "task": task, "held_out": scorer.held_out(task),
                     "accuracy": round(res["accuracy"], 4),
                     "normalized_accuracy": round(res["accuracy"] / exp, 4) if exp else None,
                     "mean_length": round(res["mean_length"], 3)})
    return rows


def build_suite_bundle(suite: Any, *, shared_method: str = "task_arithmetic",
                       shared_params: dict[str, Any] | None = None, density: float = 0.1,
                       router_epochs: int = 50, router_batch: int = 1024,
                       router_hidden: int | None = None, seed: int = 0,
                       log: Callable[[str], None] | None = None) -> Any:
    """A Twin-Merging bundle of the suite's held-in experts, router trained on ``val``."""
    from modelalloy.twin import build_bundle

    tasks = suite.info.merged_tasks
    return build_bundle(suite.base_state_dict(), {t: suite.expert_state_dict(t) for t in tasks},
                        suite.new_model(), router_data(suite, tasks), shared_method=shared_method,
                        shared_params=shared_params, density=density,
                        router_epochs=router_epochs, router_batch=router_batch,
                        router_hidden=router_hidden, seed=seed, log=log)


def twin_bench(suite: Any, *, densities: tuple[float, ...] = (0.1,),
               shared_methods: tuple[str, ...] = ("task_arithmetic",),
               routings: tuple[str, ...] = ("sample",), router_epochs: int = 50,
               router_batch: int = 1024, router_hidden: int | None = None, seed: int = 0,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Reference rows, the shared merges, and Twin-Merging for each setting; with each
    bundle's storage (bytes on disk against the experts') and timings."""
    import tempfile

    from modelalloy.twin.bundle import state_bytes

    log = log or (lambda _m: None)
    scorer = SuiteScorer(suite)
    records = scorer.reference_records()
    tasks = suite.info.merged_tasks
    experts_bytes = sum(state_bytes(suite.expert_state_dict(t)) for t in tasks)
    bundles: dict[str, Any] = {}
    for method in shared_methods:
        for density in densities:
            start = time.perf_counter()
            bundle = build_suite_bundle(suite, shared_method=method, density=density,
                                        router_epochs=router_epochs, router_batch=router_batch,
                                        router_hidden=router_hidden, seed=seed, log=log)
            build_s = time.perf_counter() - start
            if density == densities[0]:
                start = time.perf_counter()
                records += scorer.records(method, bundle.shared, params={"shared": "yes"})
                shared_s = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                bundle.save(f"{tmp}/b", experts_bytes=experts_bytes)
            for routing in routings:
                model = bundle.model(suite.new_model(), routing=routing)
                params = {"shared": method, "density": density, "routing": routing,
                          "router_hidden": bundle.router.hidden}
                start = time.perf_counter()
                records += module_records(scorer, METHOD, model, params=params,
                                          variant=f"{method}/{density}/{routing}")
                key = f"{method}/{density}/{routing}"
                bundles[key] = {**bundle.sizes, "build_seconds": round(build_s, 2),
                                "eval_seconds": round(time.perf_counter() - start, 2),
                                "shared_eval_seconds": round(shared_s, 2),
                                "router": bundle.config["router"],
                                "branches": model.branch_kinds}
                log(f"twin {key}: scored ({bundles[key].get('ratio')} of the experts' bytes)")
    return {"records": records, "bundles": bundles}
