"""The ``modelalloy`` console script: SIGINT/SIGTERM handlers first, then the CLI.

Importing the CLI and torch takes a second or two; a Ctrl-C (or SIGTERM) then used to end
in a Python traceback or a death by signal. Here the handlers that raise
:class:`~modelalloy.interrupts.Interrupted` are installed before anything heavy is imported
(``modelalloy/__init__`` imports nothing heavy itself), so every interrupt is one line.
"""

from __future__ import annotations

import os
import signal
import sys

from modelalloy.interrupts import Interrupted, interrupted_message, raise_interrupted


def entry() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, raise_interrupted)
    try:
        from modelalloy.cli import entry as run_cli
    except Interrupted as stop:
        sys.stderr.write(f"error: {interrupted_message(stop.signum)}\n")
        sys.stderr.flush()
        os._exit(128 + stop.signum)
    run_cli()


if __name__ == "__main__":
    entry()
