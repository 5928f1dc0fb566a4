"""The figure set-up and saving every bench plot shares (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(figsize: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
    """A headless (Agg) figure and its axes (a row of ``ncols`` where more than one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write ``path`` (PNG, 110 dpi, folders made), close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
