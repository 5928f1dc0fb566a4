"""Learning and searching merge recipes (``modelalloy optimize``, docs/optimize.md).

``from modelalloy.optimize import optimize`` is the Python form of the command; the learners
(``adamerging``, ``expert_merging``, ...) and the search algorithms live in the modules here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALGORITHMS", "optimize"]


def __getattr__(name: str) -> Any:  # imported on first use: the learners' modules stay light
    if name == "optimize":
        from modelalloy.optimize.driver import optimize

        return optimize
    if name == "ALGORITHMS":
        from modelalloy.optimize.algorithms import ALGORITHMS

        return ALGORITHMS
    raise AttributeError(f"module 'modelalloy.optimize' has no attribute {name!r}")
