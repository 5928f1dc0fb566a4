"""Named fault points, for the fault-injection tests (tests/faults/).

``MODELALLOY_FAULT="POINT[#N]:ACTION"`` makes the N-th time (default the first) the writer
reaches ``POINT`` do ``ACTION``; without the variable a fault point is one dictionary-free
``None`` check. Points (see docs/io.md, "Faults"):

- ``output.created``: the temporary output folder and its lock exist;
- ``writer.write``: before each tensor part is written (``#N`` picks the N-th part);
- ``writer.close``: every tensor is written, before the fsync;
- ``commit.begin``: the output is complete, before it is moved into place;
- ``commit.exchanged``: ``--force``: new and old output swapped, old not yet removed;
- ``commit.old-moved``: ``--force`` without an atomic swap: old output moved aside, new one
  not yet in place (the state the next run finishes);
- ``commit.done``: the output is in place, before the temporary names are cleaned up.

Actions: ``kill`` (SIGKILL: nothing runs after it), ``term`` / ``int`` (SIGTERM / SIGINT to
the process itself: the CLI's handlers run), ``enospc`` (an ``OSError(ENOSPC)`` raised
there), ``pause`` (sleep 30 s, for a test that sends its own signal).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

_SPEC = os.environ.get("MODELALLOY_FAULT") or None
_lock = threading.Lock()
_seen: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int, str]:
    point, _, action = spec.partition(":")
    point, _, nth = point.partition("#")
    return point, int(nth or 1), action or "kill"


def fault_point(name: str) -> None:
    """Do the configured fault if this is the chosen visit of point ``name`` (else nothing)."""
    if _SPEC is None:
        return
    point, nth, action = _parse(_SPEC)
    if point != name:
        return
    with _lock:
        _seen[name] = _seen.get(name, 0) + 1
        if _seen[name] != nth:
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "pause":
        time.sleep(30)
    # A delivered SIGTERM/SIGINT runs its Python handler at the next bytecode of the main
    # thread; give it that moment so the fault lands at this point, not later.
    if action in ("term", "int"):
        time.sleep(0.5)
