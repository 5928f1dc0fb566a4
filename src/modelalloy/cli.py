"""The `modelalloy` command line: assembles the commands of modelalloy.commands, runs one,
renders its errors as one line."""

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
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.text import Text

from modelalloy import import_with_gc_paused
from modelalloy.commands._console import cli_message, err, state
from modelalloy.errors import ModelAlloyError
from modelalloy.interrupts import Interrupted, interrupted_message, raise_interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge fine-tuned neural networks from a YAML recipe.")


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
         = False) -> None:
    state["debug"] = debug


# Listed first in --help, in this order; the other commands follow in module order.
FIRST_COMMANDS = ("merge", "plan", "methods")


def _register_commands() -> None:
    """Each module of modelalloy.commands adds its commands through register(app)."""
    import modelalloy.commands as commands

    names = [mod.name for mod in pkgutil.iter_modules(commands.__path__)]
    for name in [*FIRST_COMMANDS, *(n for n in names if n not in FIRST_COMMANDS)]:
        module = importlib.import_module(f"{commands.__name__}.{name}")
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
    return state["debug"] or "--debug" in sys.argv


def _fail(message: str, code: int) -> None:
    err.print(Text("error: ", style="red") + Text(message), soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Entry point: people get one-line errors and a non-zero exit, tracebacks with --debug."""
    warnings.showwarning = _show_warning
    state["debug"] = False  # set by the root callback (or `merge --debug`) as they parse
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
        _fail(cli_message(error), 1)
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
