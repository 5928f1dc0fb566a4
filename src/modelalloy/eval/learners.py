"""The coefficient learners on a built-in suite: each learner (modelalloy.optimize.adamerging,
expert_merging, self_positioning, sens_merging) given the suite's model and data the way its
paper uses them. The same functions make the rows of ``benchmarks/informed_rows.py`` (via
:func:`modelalloy.eval.informed.run_informed`) and the ``modelalloy optimize`` runs
(``modelalloy.search.runs``):

==================  ========================================================================
adamerging          entropy of each task's head on its unlabeled ``test`` inputs
expert_merging      a few unlabeled ``val`` samples per task (batches of one)
sens_merging        labeled ``val`` examples (sensitivities and logit distances)
self_positioning    cross-entropy on the labeled ``val`` split
==================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from modelalloy.optimize.adamerging import CoefficientResult

StateDict = Mapping[str, torch.Tensor]


def _eval() -> Any:
    import modelalloy.eval.informed as informed  # the suite glue (imports this module lazily)

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
