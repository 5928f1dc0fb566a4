"""`modelalloy merge-multi`: a multi-stage recipe (mergekit-multi's format) run as a graph."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("merge-multi")
    def merge_multi_cmd(
        recipe: Annotated[Path, typer.Argument(help="multi-document YAML of named merges")],
        intermediate_dir: Annotated[Path, typer.Option(
            "--intermediate-dir", "-I", help="work folder for the named stages' outputs")],
        out_path: Annotated[Path | None, typer.Option(
            help="output of the final (unnamed) merge")] = None,
        lazy: Annotated[bool, typer.Option(
            help="skip stages whose output exists and matches their recipe hash")] = True,
        device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
        threads: Annotated[int | None, typer.Option(help="worker threads")] = None,
        memory_budget: Annotated[str | None, typer.Option(help="e.g. 8GB")] = None,
        force: Annotated[bool, typer.Option(help="replace an existing --out-path")] = False,
    ) -> None:
        """Run each stage in dependency order; a stage's name stands for its output."""
        from modelalloy.commands._console import flag_names
        from modelalloy.multistage import run_stages

        with flag_names(out="out_path"):
            outcomes = run_stages(recipe, intermediate_dir, out_path, lazy=lazy, force=force,
                                  device=device, threads=threads, memory_budget=memory_budget)
        for o in outcomes:
            state = f"merged in {o.seconds:.1f} s" if o.ran else "up to date, skipped"
            typer.echo(f"{o.name}: {o.output} ({state})")
