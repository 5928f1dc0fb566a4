"""Plots and the summary table of a run (matplotlib is imported only here, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_progress(trials: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Fitness of every trial and the best so far."""
    plt = _plt()
    xs = [t["trial"] for t in trials]
    ys = [t["scores"]["fitness"] for t in trials]
    best, run = [], -math.inf
    for y in ys:
        run = max(run, y)
        best.append(run)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(xs, ys, s=10, alpha=0.6, label="trial")
    ax.plot(xs, best, color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coefficients(space: Any, genome: Sequence[float], path: Path) -> Path:
    """One heatmap per searched parameter: cells (rows) × models (columns)."""
    tables = space.table(genome)
    if not tables:  # nothing continuous to show (a data-flow path without factors)
        return path
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(2.5 + 2.2 * len(tables),
                                                      1.6 + 0.22 * len(space.cells)),
                             squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items(), strict=True):
        b = space.bound(name)
        im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=b.lo, vmax=b.hi)
        cols = len(rows[0])
        ax.set_xticks(range(cols))
        labels = getattr(space, "column_labels", [Path(m).name for m in space.models])
        ax.set_xticklabels(labels if cols > 1 else ["all"],
                           rotation=45, ha="right", fontsize=6)
        if len(space.cells) <= 60:
            ax.set_yticks(range(len(space.cells)))
            ax.set_yticklabels(space.cells, fontsize=5)
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def top_trials(trials: Sequence[Mapping[str, Any]], n: int = 5) -> list[Mapping[str, Any]]:
    return sorted(trials, key=lambda t: (-t["scores"]["fitness"], t["trial"]))[:n]


def summary_markdown(ctx: Any, chosen: Mapping[str, Any]) -> str:
    keys = [k for k in chosen["scores"] if k != "fitness"]
    lines = [f"# {ctx.algorithm}: {len(ctx.trials)} trials", "",
             f"Objectives: {', '.join(ctx.objectives.specs)} (weights "
             f"{', '.join(f'{w:g}' for w in ctx.objectives.weights)}); seed {ctx.seed}; "
             f"chosen trial {chosen['trial']} → recipe.yaml", "",
             "| trial | fitness | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for t in top_trials(ctx.trials):
        lines.append(f"| {t['trial']} | {t['scores']['fitness']:.4f} | "
                     + " | ".join(f"{t['scores'].get(k, float('nan')):.4f}" for k in keys)
                     + " |")
    if ctx.notes:
        lines += ["", "Notes: " + "; ".join(f"{k}: {v}" for k, v in ctx.notes.items())]
    return "\n".join(lines) + "\n"


def print_summary(result: Any, console: Any) -> None:
    """The run's top trials as a rich table."""
    from rich.table import Table

    chosen = result.best
    keys = [k for k in chosen["scores"] if k != "fitness"][:8]
    table = Table(title=f"{result.algorithm}: {len(result.trials)} trials in "
                        f"{result.seconds:.1f} s")
    for col in ["trial", "fitness", *keys]:
        table.add_column(col, justify="right")
    for t in top_trials(result.trials):
        style = "bold green" if t["trial"] == chosen["trial"] else None
        table.add_row(str(t["trial"]), f"{t['scores']['fitness']:.4f}",
                      *[f"{t['scores'].get(k, float('nan')):.4f}" for k in keys], style=style)
    console.print(table)
