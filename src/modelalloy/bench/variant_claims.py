"""The claims the scale and base-quality studies test, from per-example hits, paired.

"What Matters for Model Merging at Scale" (Yadav et al. 2024) scores a merge ``m`` by its
*normalised accuracy*, on each held-in task ``t`` the merged model's accuracy divided by that
of the task's own expert, averaged over the ``T`` tasks:

    norm(m) = 1/T Σ_t acc(m, t) / acc(expert_t, t)

and finds that it grows with model size and with a stronger base, and that the methods'
*spread*, ``max_m norm(m) − min_m norm(m)``, shrinks with size (the methods converge).

Every setting of a study is a suite of its own, built from the same data seed, so its test
examples are the same inputs (:func:`same_test_examples` checks the files). The bootstrap
(:func:`modelalloy.eval.intervals.statistic_interval`) resamples one set of example indices for
every setting, method and expert, so a change between two settings is paired over the same
examples. The intervals measure the test-set noise only: each setting's experts come from one
fine-tuning run (``--seeds N`` measures the spread over runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelalloy.eval.intervals import normalized, statistic_interval
from modelalloy.eval.report import interval_verdict

Key = tuple[str, str]  # (method, variant)
Hits = Mapping[tuple[str, str, str], str]  # (method, variant, task) -> per-example 0/1 string
EXPERT: Key = ("expert", "reference")
Interval = tuple[float, float, float]  # (value, low, high)


def _groups(hits: Hits, keys: Sequence[Key], tasks: Sequence[str]) -> list[list[str]]:
    """Per method, then the experts: the hit strings of every task."""
    return [[hits[(*k, t)] for t in tasks] for k in (*keys, EXPERT)]


def _norms(x: list[np.ndarray]) -> np.ndarray:
    """(methods, k) normalised accuracies from [method_1 .. method_M, experts] (tasks, k)."""
    return np.stack([normalized(a, x[-1]) for a in x[:-1]])


def _mean(n: np.ndarray) -> np.ndarray:
    return n.mean(axis=0)


def _spread(n: np.ndarray) -> np.ndarray:
    return n.max(axis=0) - n.min(axis=0)


AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"mean": _mean, "spread": _spread}


def setting_interval(hits: Hits, keys: Sequence[Key], tasks: Sequence[str],
                     aggregate: str) -> Interval:
    """The methods' mean normalised accuracy, or their spread, in one setting."""
    agg = AGGREGATES[aggregate]
    return statistic_interval(lambda x: agg(_norms(x)), _groups(hits, keys, tasks))


def change_interval(first: Hits, last: Hits, keys: Sequence[Key], tasks: Sequence[str],
                    aggregate: str) -> Interval:
    """``aggregate`` in setting ``last`` minus in ``first``, paired over the same examples."""
    agg = AGGREGATES[aggregate]
    a, b = _groups(first, keys, tasks), _groups(last, keys, tasks)
    m = len(a)
    return statistic_interval(lambda x: agg(_norms(x[m:])) - agg(_norms(x[:m])), a + b)


def same_test_examples(folders: Sequence[Path], tasks: Sequence[str]) -> bool:
    """Whether the suites in ``folders`` hold byte-identical test inputs and labels for
    ``tasks`` (then their per-example hits can be paired)."""
    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for t in tasks:
            for split in ("test", "labels"):
                path = folder / "data" / t / f"{split}.safetensors"
                h.update(path.read_bytes() if path.is_file() else b"missing")
        return h.hexdigest()

    return len({digest(f) for f in folders}) == 1


# The claims a study tests: (what changes, name, the aggregate, the direction the paper finds).
CLAIMS: dict[str, list[tuple[str, str, int]]] = {
    "scale": [("larger models merge more easily (normalised accuracy up)", "mean", +1),
              ("methods converge at scale (spread down)", "spread", -1)],
    "base-quality": [("a stronger base helps (normalised accuracy up)", "mean", +1),
                     ("methods converge with a stronger base (spread down)", "spread", -1)],
}


# What must differ between the settings for a study to test its claims at all: the base's
# held-in accuracy must rise from the weakest base to the strongest (scale changes the
# parameter count, which the table shows exactly).
CHECKS: dict[str, tuple[str, Key]] = {"base-quality": ("the base's held-in accuracy",
                                                       ("base", "reference"))}


def accuracy_change(first: Hits, last: Hits, key: Key, tasks: Sequence[str]) -> Interval:
    """``key``'s mean accuracy over ``tasks`` in ``last`` minus in ``first``, paired."""
    a, b = [first[(*key, t)] for t in tasks], [last[(*key, t)] for t in tasks]
    return statistic_interval(lambda x: x[1].mean(axis=0) - x[0].mean(axis=0), [a, b])


def claim_rows(study: str, settings: Sequence[tuple[str, Hits]], keys: Sequence[Key],
               tasks: Sequence[str], paired: bool) -> list[dict[str, Any]]:
    """Each claim of ``study``: its aggregate per setting, the change from the first setting
    (smallest / weakest) to the last, and the verdict from the change's interval (a claimed
    increase shows when the interval lies above 0 and does not show when it lies below +1
    point; a claimed decrease the other way round). "cannot tell" without ``paired`` (the
    settings' test examples differ: no change is computed) and where the study's
    :data:`CHECKS` fails (e.g. the bases are not stronger: nothing was varied)."""
    failed = None
    if study in CHECKS and paired:
        what, key = CHECKS[study]
        d, low, high = accuracy_change(settings[0][1], settings[-1][1], key, tasks)
        if low <= 0:
            failed = (f"{what} does not rise from {settings[0][0]} to {settings[-1][0]} "
                      f"({100 * d:+.1f}, 95% {100 * low:+.1f}..{100 * high:+.1f})")
    out = []
    for claim, aggregate, direction in CLAIMS[study]:
        per = {label: setting_interval(h, keys, tasks, aggregate) for label, h in settings}
        row: dict[str, Any] = {"claim": claim, "aggregate": aggregate,
                               "per_setting": {k: list(v) for k, v in per.items()},
                               "from": settings[0][0], "to": settings[-1][0]}
        if paired:
            change = change_interval(settings[0][1], settings[-1][1], keys, tasks, aggregate)
            low, high = change[1:]
            row["change"] = list(change)
            row["verdict"] = interval_verdict(*((low, high) if direction > 0 else
                                                (-high, -low)))
            if failed:
                row["verdict"], row["reason"] = "cannot tell", failed
        else:
            row["verdict"] = "cannot tell"
        out.append(row)
    return out


def method_changes(settings: Sequence[tuple[str, Hits]], keys: Sequence[Key],
                   tasks: Sequence[str]) -> dict[Key, Interval]:
    """Each method's normalised accuracy in the last setting minus the first's, paired."""
    return {k: change_interval(settings[0][1], settings[-1][1], [k], tasks, "mean")
            for k in keys}


__all__ = ["CHECKS", "CLAIMS", "accuracy_change", "change_interval", "claim_rows",
           "method_changes", "same_test_examples", "setting_interval"]
