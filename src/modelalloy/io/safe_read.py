"""Read small files that a model folder or recipe names, without trusting them.

A ``config.json`` may be a link to ``/dev/zero`` (read until memory runs out), a FIFO (a read
that never returns), or a few hundred megabytes of nesting. Every such file is opened with
``O_NONBLOCK`` (opening a FIFO does not wait for a writer), checked with ``fstat`` to be a
regular file no larger than a limit, and only then read; JSON too deep for the parser is a
one-line error like any other bad JSON.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from modelalloy.errors import ModelAlloyError

MiB = 1 << 20
# Generous for what these files hold: configs are kilobytes, shard indexes of the largest
# models a few megabytes, recipes a few kilobytes.
CONFIG_LIMIT = 16 * MiB
INDEX_LIMIT = 64 * MiB

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def _one_line(text: object, limit: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _size_text(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


def open_regular(path: Path, error: type[ModelAlloyError], what: str) -> int:
    """A read-only descriptor for ``path``, refusing anything but a regular file (checked on
    the open descriptor, so a link swapped meanwhile cannot slip through)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except ValueError:  # a NUL byte: no such path can exist
        raise error(f"{str(path)!r}: a path cannot hold a NUL byte; fix the path") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({_one_line(e.strerror or e)})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise error(f"{path}: {what} is {kind}, not a regular file; refusing to read it")
    os.set_blocking(fd, True)
    return fd


def read_regular_file(path: Path, limit: int, error: type[ModelAlloyError], what: str) -> bytes:
    """The bytes of ``path`` (a regular file of at most ``limit`` bytes), else ``error``."""
    path = Path(path)
    fd = open_regular(path, error, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path}: {what} is {_size_text(size)}, over the {_size_text(limit)} "
                        "this file can plausibly need; check the file")
        chunks, got = [], 0
        while got <= limit:  # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise error(f"{path}: {what} grew past {_size_text(limit)} while it was read; "
                        "check the file")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({_one_line(e.strerror or e)})") from None
    finally:
        os.close(fd)


def parse_json(raw: bytes | str, where: str, error: type[ModelAlloyError], what: str,
               **loads: Any) -> Any:
    """``json.loads`` with every failure, too-deep nesting included, as one-line ``error``."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, **loads)
    except UnicodeDecodeError:
        raise error(f"{where}: {what} is not UTF-8 text; fix or re-download it") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid {what}, not valid JSON ({_one_line(e)}); fix or "
                    "re-download it") from None
    except RecursionError:
        raise error(f"{where}: {what} is nested too deeply to be real; fix or re-download "
                    "it") from None


def read_json_file(path: Path, limit: int, error: type[ModelAlloyError], what: str,
                   **loads: Any) -> Any:
    """Parse the JSON file ``path`` under the checks of :func:`read_regular_file`."""
    return parse_json(read_regular_file(path, limit, error, what), str(path), error, what,
                      **loads)
