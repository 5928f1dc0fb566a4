"""`modelalloy methods`: every merge method with its parameters, defaults and paper."""

from __future__ import annotations

import typer
from rich.table import Table

from modelalloy.commands._console import out


def register(app: typer.Typer) -> None:
    @app.command("methods")
    def methods() -> None:
        """List every merge method with its parameters, defaults and paper."""
        from modelalloy.methods import list_methods

        table = Table(title="merge methods")
        for col in ("method", "base", "models", "parameters (default)", "paper"):
            table.add_column(col, overflow="fold")
        for spec in list_methods():
            params = "\n".join(f"{p.name}{'[per model]' if p.per_model else ''} = {_default(p)}"
                               for p in spec.params)
            count = (f"{spec.min_models}" if spec.max_models == spec.min_models
                     else f"{spec.min_models}+" if spec.max_models is None
                     else f"{spec.min_models}-{spec.max_models}")
            table.add_row(spec.name, spec.base, count, params or "-", spec.paper)
        out.print(table)


def _default(p) -> str:
    """A parameter's default as `modelalloy methods` shows it: mergekit's, and the paper's when
    ``conventions: paper`` changes it."""
    if p.required:
        return "(required)"
    paper = p.default_for("paper")
    return f"{p.default!r}" + (f" (paper: {paper!r})" if paper != p.default else "")
