"""`modelalloy inspect`: how much a recipe's experts interfere, before merging."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        recipe: Annotated[Path, typer.Argument(help="recipe YAML (with a base_model)")],
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help="folder for report.html, PNG heatmaps and report.json")] = None,
        density: Annotated[float, typer.Option(
            help="TIES trim density when the recipe's method has none")] = 0.2,
        threads: Annotated[int | None, typer.Option(help="worker threads (default: ≤4)")] = None,
        force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    ) -> None:
        """Per layer and tensor family: task-vector norms, pairwise cosines, sign-conflict
        rate, TIES/TALL mask overlap, and each expert's share surviving the method."""
        from rich.console import Console

        from modelalloy.inspection import inspect_recipe
        from modelalloy.inspection.report import print_tables, write_report
        from modelalloy.io.writer import check_output_path

        if out is not None:
            from modelalloy.extras import require_extra

            require_extra("viz", "inspect --out")
            check_output_path(out, [], force)
        inspection = inspect_recipe(recipe, density=density, threads=threads,
                                    progress=sys.stderr.isatty())
        print_tables(inspection, Console(width=200))
        if out is not None:
            write_report(inspection, out, force=force)
            typer.echo(f"wrote {out / 'report.html'} ({len(inspection.records)} tensors, "
                       f"{inspection.seconds:.1f} s)")
