"""The genome's building blocks: a free parameter's bounds and one gene's place.

Shared by the parameter space (space.py) and the data-flow space (dataflow.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from modelalloy.errors import OptimizeError


def check_keys(block: Iterable[str], allowed: Sequence[str], where: str) -> None:
    """Refuse the first key of a template block that is not ``allowed``, in one line."""
    unknown = [k for k in block if k not in allowed]
    if unknown:
        raise OptimizeError(f"{where}.{unknown[0]}: unknown key; use {', '.join(allowed)}")


@dataclass(frozen=True)
class Bound:
    """A free parameter: its bounds, start point and whether it is set per model."""

    name: str
    lo: float
    hi: float
    init: float
    per_model: bool

    def value(self, unit: float) -> float:
        u = min(1.0, max(0.0, float(unit)))
        return round(self.lo + u * (self.hi - self.lo), 6)

    def unit(self, value: float) -> float:
        return 0.0 if self.hi == self.lo else (value - self.lo) / (self.hi - self.lo)


@dataclass(frozen=True)
class Gene:
    param: str
    cell: int
    model: int | None  # None: a global parameter
