"""SIGINT and SIGTERM as an exception, from the first instant of the command line.

Kept free of heavy imports: the console entry (:mod:`modelalloy._entry`) installs these
handlers before torch, typer or anything else is imported, so a Ctrl-C in the first fraction
of a second is one line like any other.
"""

from __future__ import annotations

import signal


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised on the main thread by our own handler.

    Not a KeyboardInterrupt: the CLI library turns those into a bare exit code before our
    handler could say what happened. Cleanup code that runs on any exception (the writer's
    temporary folder, the engine's workers) sees it like a KeyboardInterrupt.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def interrupted_message(signum: int) -> str:
    return (f"interrupted ({signal.Signals(signum).name}): stopped before finishing; no output "
            "was written")
