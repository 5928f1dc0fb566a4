"""`modelalloy optimize`: learn or search a merge recipe against an objective."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def _options(pairs: list[str]) -> dict[str, object]:
    import yaml

    from modelalloy.errors import OptimizeError

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OptimizeError(f"--option '{pair}': write KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def register(app: typer.Typer) -> None:
    @app.command("optimize")
    def optimize_(
        algorithm: Annotated[str | None, typer.Argument(
            help="evolve, adamerging, expert_merging, ... (--list shows them)")] = None,
        recipe: Annotated[Path | None, typer.Argument(
            help="a recipe template with a `search:` block")] = None,
        objective: Annotated[list[str] | None, typer.Option(
            help="suite:tiny-vision, suite:tiny-lm or python:module:function (repeatable)")
        ] = None,
        out: Annotated[Path | None, typer.Option(help="folder for the results")] = None,
        budget: Annotated[int | None, typer.Option(
            help="trials (searches) or steps (learners); default: the algorithm's")] = None,
        workers: Annotated[int, typer.Option(help="parallel trials (Ray above 1)")] = 1,
        ray_address: Annotated[str | None, typer.Option(
            help="an existing Ray cluster (host:port, ray://host:port, auto)")] = None,
        seed: Annotated[int, typer.Option(help="seed of the optimizer")] = 0,
        resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
        weights: Annotated[str | None, typer.Option(
            help="comma-separated weight per --objective")] = None,
        option: Annotated[list[str] | None, typer.Option(
            help="an algorithm option KEY=VALUE (repeatable; --list shows them)")] = None,
        preference: Annotated[str | None, typer.Option(
            help="map: comma-separated weight per score, picks the front point")] = None,
        list_: Annotated[bool, typer.Option("--list", help="list the algorithms")] = False,
        template: Annotated[str | None, typer.Option(
            help="print a template recipe over a suite's models, e.g. "
                 "'suite:tiny-vision?size=smoke'")] = None,
        method: Annotated[str, typer.Option(help="merge method of --template")
                          ] = "task_arithmetic",
    ) -> None:
        """Search or learn the merge coefficients of RECIPE against --objective."""
        from modelalloy.commands._console import flag_names
        from modelalloy.errors import OptimizeError

        if list_:
            _print_algorithms()
            return
        if template is not None:
            import yaml

            from modelalloy.search.objectives import suite_template

            typer.echo(yaml.safe_dump(suite_template(template, method), sort_keys=False))
            return
        if algorithm is None or recipe is None or out is None or not objective:
            raise OptimizeError("give ALGORITHM RECIPE --objective OBJ --out DIR "
                                "(modelalloy optimize --list shows the algorithms)")
        from rich.console import Console

        from modelalloy.optimize.report import print_summary
        from modelalloy.search.driver import optimize
        from modelalloy.search.heap import keep_heap

        keep_heap()  # the command's process is the search's: trials reuse freed memory

        w = None
        if weights:
            try:
                w = [float(x) for x in weights.split(",")]
            except ValueError:
                raise OptimizeError(f"--weights '{weights}': give numbers, "
                                    "comma-separated") from None
        opts = _options(option or [])
        if preference:
            try:
                opts["preference"] = [float(x) for x in preference.split(",")]
            except ValueError:
                raise OptimizeError(f"--preference '{preference}': give numbers, "
                                    "comma-separated") from None
        err = Console(stderr=True)
        with flag_names(objectives="objective"):  # the API's list, the command's repeated flag
            result = optimize(algorithm, recipe, objective, out, weights=w, budget=budget,
                              workers=workers, ray_address=ray_address, seed=seed,
                              resume=resume, options=opts, progress=sys.stderr.isatty(),
                              echo=lambda m: err.print(m))
        print_summary(result, Console())
        typer.echo(f"best: trial {result.best['trial']}, fitness "
                   f"{result.best['scores']['fitness']:.4f}; recipe {result.recipe_path} "
                   f"(modelalloy merge {result.recipe_path} MERGED)")


def _print_algorithms() -> None:
    from rich.console import Console
    from rich.table import Table

    from modelalloy.search.algorithms import ALGORITHMS

    table = Table(title="optimize algorithms")
    table.add_column("algorithm", no_wrap=True)
    for col in ("kind", "what", "options (default)", "budget", "paper"):
        table.add_column(col, overflow="fold")
    for spec in ALGORITHMS.values():
        opts = "\n".join(f"{k} = {d!r}" for k, (d, _h) in spec.options.items()) or "-"
        table.add_row(spec.name, spec.kind, spec.summary, opts, str(spec.budget), spec.paper)
    Console().print(table)
