"""The `modelalloy` command line: thin wrappers that parse, call one function, render."""

from __future__ import annotations

import atexit
import importlib
import os
import pkgutil
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelalloy import import_with_gc_paused
from modelalloy.errors import ModelAlloyError
from modelalloy.interrupts import Interrupted, interrupted_message, raise_interrupted

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
    as_adapter: Annotated[bool, typer.Option(
        help="The models are LoRA adapters of one base (base+adapter): write the merged "
             "adapter (peft's combinations) instead of a model.")] = False,
) -> None:
    """Merge the models of RECIPE into OUTPUT_DIR (written atomically)."""
    _state["debug"] = _state["debug"] or debug
    if as_adapter:
        from modelalloy.lora.from_recipe import merge_recipe_adapters

        merge_recipe_adapters(recipe, output_dir, force=force, seed=seed)
        out.print(f"merged the adapters of {recipe} into the adapter {output_dir}")
        return
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


@contextmanager
def _interrupts_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` while the command runs (main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, raise_interrupted)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _command_name() -> str | None:
    """The subcommand on the command line: the root takes only flags (`--debug`), so it is the
    first argument that is not an option."""
    return next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)


def _usage_error(error: Exception) -> tuple[str, int] | None:
    """(one line, exit code) for a command-line usage error, else None.

    Recognised by the interface that click's and typer's usage errors share
    (`format_message()` and an integer `exit_code`), not by importing either library's
    exception classes: which library defines them changes between typer releases.
    """
    format_message = getattr(error, "format_message", None)
    exit_code = getattr(error, "exit_code", None)
    if not callable(format_message) or not isinstance(exit_code, int):
        return None
    command = getattr(getattr(error, "ctx", None), "command_path", None) or "modelalloy"
    message = " ".join(str(format_message()).split())
    return f"{command}: {message} (see '{command} --help')", exit_code


def _debugging() -> bool:
    return _state["debug"] or "--debug" in sys.argv


def _fail(message: str, code: int) -> None:
    err.print(Text("error: ", style="red") + Text(message), soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Entry point: people get one-line errors and a non-zero exit, tracebacks with --debug."""
    warnings.showwarning = _show_warning
    _state["debug"] = False  # set by the root callback (or `merge --debug`) as they parse
    try:
        with _interrupts_raise():
            import_with_gc_paused("torch")  # every command needs it; see the function
            code = app(standalone_mode=False)
        # Without standalone mode, a command's typer.Exit code is returned instead of raised.
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except ModelAlloyError as error:
        if _debugging():
            traceback.print_exc()
        _fail(str(error), 1)
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        _fail(interrupted_message(signum), 128 + signum)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(1)
    except ModuleNotFoundError as error:
        from modelalloy.extras import missing_extra_message

        message = missing_extra_message(error.name or "", _command_name())
        if message is None or _debugging():
            raise
        _fail(message, 1)
    except Exception as error:
        usage = _usage_error(error)
        if usage is None:
            raise
        _fail(*usage)


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
