"""MAP's entry point: the plain and Bayesian variants (map_search.py) or nested (map_nested.py).

Kept apart so map_nested, which builds on map_search's surrogate and front, is not imported
back by it (no import circle).
"""

from __future__ import annotations

from typing import Any

from modelalloy.optimize import map_nested, map_search


def run(ctx: Any) -> None:
    if ctx.options["variant"] == "nested":
        map_nested.run_nested(ctx)
    else:
        map_search.run(ctx)
