"""``modelalloy optimize``: learn or search a merge recipe against an objective (docs/optimize.md).

``from modelalloy.search import optimize`` is the Python form of the command. This layer sits
above the suites and the evaluation code (its objectives score on them); the algorithms
themselves, the search space and the in-memory candidate are in :mod:`modelalloy.optimize`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALGORITHMS", "optimize"]


def __getattr__(name: str) -> Any:  # imported on first use: the learners' modules stay light
    if name == "optimize":
        from modelalloy.search.driver import optimize

        return optimize
    if name == "ALGORITHMS":
        from modelalloy.search.algorithms import ALGORITHMS

        return ALGORITHMS
    raise AttributeError(f"module 'modelalloy.search' has no attribute {name!r}")
