"""The `modelalloy` command line: thin wrappers that parse, call one function, render."""

from __future__ import annotations

import atexit
import importlib
import os
import pkgutil
import sys
import threading
import traceback
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelalloy.errors import ModelAlloyError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge fine-tuned neural networks from a YAML recipe.")
out = Console()
err = Console(stderr=True)

# Set by the root callback; read by `main` to decide whether to show tracebacks.
_state = {"debug": False}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
         = False) -> None:
    _state["debug"] = debug


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format).")],
    output_dir: Annotated[Path, typer.Argument(help="Folder to create for the merged model.")],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int | None, typer.Option(help="Overrides the recipe's seed.")] = None,
    threads: Annotated[int | None, typer.Option(help="Worker threads (default: ≤4).")] = None,
    memory_budget: Annotated[str | None, typer.Option(
        help="Cap on the process's memory, e.g. 8GB.")] = None,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        help="Warn instead of failing on NaN/Inf in inputs.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Merge the models of RECIPE into OUTPUT_DIR (written atomically)."""
    _state["debug"] = _state["debug"] or debug
    from modelalloy.engine.run import run_recipe

    result = run_recipe(recipe, output_dir, device=device, seed=seed, threads=threads,
                        memory_budget=memory_budget, shard_size=shard_size, force=force,
                        allow_nonfinite=allow_nonfinite, progress=sys.stderr.isatty())
    for warning in result.warnings:
        err.print(Text("warning: ", style="yellow") + Text(warning), soft_wrap=True)
    out.print(f"merged {result.tensors} tensors into {result.path} in {result.seconds:.1f} s: "
              f"read {human_bytes(result.bytes_read)}, wrote {human_bytes(result.bytes_written)}"
              f" in {len(result.files)} shard(s), peak RSS {human_bytes(result.peak_rss)}")


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format).")],
    threads: Annotated[int | None, typer.Option(help="Worker threads to plan for.")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="Budget to plan for.")] = None,
) -> None:
    """Check a recipe and its models without merging: summary, problems, memory, bytes."""
    from modelalloy.engine.run import (
        as_recipe,
        default_threads,
        describe,
        make_plan,
        size_option,
    )

    with ExitStack() as stack:
        the_plan = make_plan(as_recipe(recipe), stack)
        budget = size_option("--memory-budget", memory_budget) if memory_budget else None
        info = describe(the_plan, threads or default_threads(), budget)
    table = Table(show_header=False, title=f"plan for {recipe}")
    table.add_row("method", info["method"])
    table.add_row("models", "\n".join(info["models"]))
    table.add_row("tensors", f"{info['tensors']} ({info['merged']} merged, "
                             f"{info['copied']} copied)")
    table.add_row("layers", str(info["layers"]))
    table.add_row("to read", human_bytes(info["bytes_read"]))
    table.add_row("to write", human_bytes(info["bytes_written"]))
    table.add_row("estimated peak memory", human_bytes(info["estimated_peak_bytes"]))
    out.print(table)
    if info["problems"]:
        for problem in info["problems"]:
            err.print(Text("problem: ", style="red") + Text(problem), soft_wrap=True)
        raise typer.Exit(1)
    out.print("[green]no problems found[/]")


@app.command()
def methods() -> None:
    """List every merge method with its parameters, defaults and paper."""
    from modelalloy.methods import list_methods

    table = Table(title="merge methods")
    for col in ("method", "base", "models", "parameters (default)", "paper"):
        table.add_column(col, overflow="fold")
    for spec in list_methods():
        params = "\n".join(f"{p.name}{'[per model]' if p.per_model else ''} = {p.default!r}"
                           for p in spec.params)
        count = (f"{spec.min_models}" if spec.max_models == spec.min_models
                 else f"{spec.min_models}+" if spec.max_models is None
                 else f"{spec.min_models}-{spec.max_models}")
        table.add_row(spec.name, spec.base, count, params or "-", spec.paper)
    out.print(table)


def _register_commands() -> None:
    """Each module of modelalloy.commands adds its commands through register(app)."""
    import modelalloy.commands as commands

    for mod in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Warnings are for people too: one line, without the source line Python would show.
    err.print(Text("warning: ", style="yellow") + Text(str(message)), soft_wrap=True)


def main() -> None:
    """Entry point: people get one-line errors and a non-zero exit, tracebacks with --debug."""
    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)
        # Without standalone mode, click returns a command's typer.Exit code instead of exiting.
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except ModelAlloyError as error:
        if _state["debug"] or "--debug" in sys.argv:
            traceback.print_exc()
        err.print(Text("error: ", style="red") + Text(str(error)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: no output was written")
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as error:  # click usage errors
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


def entry() -> None:
    """The ``modelalloy`` command (console script, ``python -m modelalloy``): :func:`main`,
    then a quick exit.

    Tearing the interpreter down (freeing every module of torch and numba, running their
    finalizers) takes 0.5–0.8 s, a fifth of a 1B-parameter linear merge. By then the
    command's work is done: the output is fsynced and renamed into place, the exit handlers
    run here, and the streams are flushed, so the process can end with ``os._exit``. While
    another non-daemon thread still runs (the interpreter would wait for it), the exit is
    the normal one.
    """
    try:
        main()
        code: object = 0
    except SystemExit as stop:
        code = stop.code
    if code is None:
        code = 0
    if not isinstance(code, int) or _other_threads_running():
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


def _other_threads_running() -> bool:
    main_thread = threading.main_thread()
    return any(t is not main_thread and not t.daemon and t.is_alive()
               for t in threading.enumerate())


if __name__ == "__main__":
    entry()
