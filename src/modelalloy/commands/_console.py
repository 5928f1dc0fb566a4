"""What the commands share: the two consoles, the --debug state, byte sizes for people and
library errors in the words of the command line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

from modelalloy.errors import ModelAlloyError

out = Console()
err = Console(stderr=True)

# Set by the root callback (and `merge --debug`); read by cli.main to decide whether to show
# tracebacks.
state = {"debug": False}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def cli_message(error: BaseException) -> str:
    """A library error's line as the command line says it: each argument the error names as
    the API spells it (``options``: ``force=True``, ``memory_budget='2GB'``, ``rank=17``)
    becomes the command's flag (``--force``, ``--memory-budget 2GB``, ``--rank 17``); the
    flags of every command are its function's arguments with dashes (typer's rule)."""
    message = str(error)
    for name in getattr(error, "options", ()):
        flag = "--" + name.replace("_", "-")

        def as_flag(match: re.Match[str], flag: str = flag) -> str:
            value = match.group(1)
            if value == "True":
                return flag
            inner = value.strip("[]").strip("'")  # a one-item list: a repeatable flag
            return f"{flag} {inner}"

        message = re.sub(rf"\b{re.escape(name)}=(\['[^']*'\]|'[^']*'|[^\s,;:)]+)", as_flag,
                         message)
    return message


@contextmanager
def flag_names(**renames: str) -> Iterator[None]:
    """Errors raised inside name the command's flag where it differs from the API's argument:
    ``with flag_names(out="out_path"):`` makes ``out=PATH`` read ``--out-path PATH``."""
    try:
        yield
    except ModelAlloyError as error:
        renamed = [name for name in error.options if name in renames]
        if not renamed:
            raise
        message = str(error)
        for name in renamed:
            message = re.sub(rf"\b{re.escape(name)}=", f"{renames[name]}=", message)
        error.args = (message,)
        error.options = tuple(renames.get(name, name) for name in error.options)
        raise
