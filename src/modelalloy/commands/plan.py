"""`modelalloy plan RECIPE`: check a recipe and its models without merging."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from modelalloy.commands._console import err, human_bytes, out


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format).")],
        threads: Annotated[int | None, typer.Option(help="Worker threads to plan for.")] = None,
        memory_budget: Annotated[str | None, typer.Option(help="Budget to plan for.")] = None,
    ) -> None:
        """Check a recipe and its models without merging: summary, problems, memory, bytes."""
        from modelalloy.engine.direct_reads import use_direct_io
        from modelalloy.engine.run import (
            as_recipe,
            default_threads,
            describe,
            make_plan,
            size_option,
        )

        with ExitStack() as stack:
            the_plan = make_plan(as_recipe(recipe), stack)
            budget = size_option("memory_budget", memory_budget) if memory_budget else None
            # the merge's own default (more threads when it reads around the page cache)
            direct = use_direct_io("auto", the_plan.bytes_read)
            info = describe(the_plan, threads or default_threads(direct), budget, direct)
        table = Table(show_header=False, title=f"plan for {recipe}")
        table.add_row("method", info["method"])
        table.add_row("models", "\n".join(info["models"]))
        table.add_row("tensors", f"{info['tensors']} ({info['merged']} merged, "
                                 f"{info['copied']} copied)")
        table.add_row("layers", str(info["layers"]))
        table.add_row("to read", human_bytes(info["bytes_read"]))
        table.add_row("to write", human_bytes(info["bytes_written"]))
        table.add_row("direct I/O", "on (inputs exceed half the memory available)"
                      if info["direct_io"] else "off")
        table.add_row("estimated peak memory", human_bytes(info["estimated_peak_bytes"]))
        out.print(table)
        for note in info["notes"]:
            err.print(Text("note: ", style="yellow") + Text(note), soft_wrap=True)
        if info["problems"]:
            for problem in info["problems"]:
                err.print(Text("problem: ", style="red") + Text(problem), soft_wrap=True)
            raise typer.Exit(1)
        out.print("[green]no problems found[/]")
