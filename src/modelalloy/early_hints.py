"""Start reading a merge's first tensors while torch imports (standard library only).

Importing torch takes about a second of every `modelalloy merge`. On a cold page cache
(models larger than RAM, or just downloaded) the first tensors can be on their way
meanwhile: ``modelalloy/__init__`` calls :func:`start` before it imports torch, and when the
process is the ``merge`` command a daemon thread reads the first tensor data of every model
the recipe names into the page cache, a thread per model (``sendfile`` to /dev/null: no copy,
the GIL released), ``CHUNK_BYTES`` at a time, until the merge itself reads
(:func:`stop`, from ``Checkpoint.prefetch`` / ``read_direct``) or ``HINT_BYTES`` per model
are read. The engine merges the largest tensors first, in storage order among equals (an
LLM's embeddings, which its first shard usually starts with, are among the first); its own
hints take over from there (``Checkpoint.prefetch``), and hinted bytes merged later are
found in the page cache then.

The ranges read are recorded (:func:`hinted_range`): a merge that reads with ``O_DIRECT``
(docs/direct_io.md) reads them through the page cache instead, where they are, and drops
their pages after use, rather than reading them from the disk a second time.

Best effort and cheap: model paths are found in the recipe text with a pattern (no YAML or
torch import), anything unexpected skips the hint, pages already cached (a one-byte
``RWF_NOWAIT`` probe at both ends) are not read again, and ``MODELALLOY_EARLY_HINTS=0`` turns
it off. The merge itself validates everything as before.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
from pathlib import Path

# Per model: about what this disk reads during the import without slowing it (3B, 4 models
# from a cold cache, torch's files cached: 0.8 GB read, the import 1.2-1.3 s as without;
# 2.4 GB made it 1.4-1.9 s). The merge's first read stops the hints sooner.
HINT_BYTES = 256 << 20
HINT_TOTAL_MAX = 2 << 30  # over all models; also at most a quarter of MemAvailable
# One read per model's thread at a time: large enough that the threads (which need the GIL
# between reads, while the import holds it) keep the disk busy, small enough that the merge's
# first read stops them soon.
CHUNK_BYTES = 32 << 20
# Recorded ranges are whole blocks of this size (io/checkpoint.py's DIRECT_ALIGN): a direct
# read around them stays aligned.
BLOCK = 4096
_MODEL_LINE = re.compile(r"^\s*(?:-\s*)?(?:base_model|model)\s*:\s*(?P<path>[^#{}\[\],]+?)\s*"
                         r"(?:#.*)?$")

FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
_ranges: dict[FileKey, tuple[int, int]] = {}  # file -> (first, end) bytes asked for
_ranges_lock = threading.Lock()
_merge_started = threading.Event()


def stop() -> None:
    """The merge reads now (its own reads and hints keep the disk busy): ask for no more."""
    if not _merge_started.is_set():  # called on every read: a flag test, mostly
        _merge_started.set()


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def hinted_range(fd: int) -> tuple[int, int] | None:
    """(first, end): the block-aligned bytes of the open file ``fd`` that were hinted, so are
    in the page cache or on their way (read them through it), or None."""
    if not _ranges:
        return None
    try:
        key = _key(os.fstat(fd))
    except OSError:
        return None
    with _ranges_lock:
        return _ranges.get(key)


def forget() -> None:
    """Forget the recorded ranges (a new merge in the same process, tests)."""
    with _ranges_lock:
        _ranges.clear()


def merge_recipe(argv: list[str]) -> Path | None:
    """The recipe of a ``modelalloy [options] merge RECIPE ...`` command line (``argv[0]``
    the console script, or ``-m`` while ``python -m modelalloy`` imports the package), else
    None: nothing is hinted for other programs that import modelalloy."""
    if not argv or not (argv[0] == "-m" or Path(argv[0]).name == "modelalloy"):
        return None
    words = [a for a in argv[1:] if not a.startswith("-")]
    if len(words) < 2 or words[0] != "merge":
        return None
    return Path(words[1])


def model_paths(recipe: Path) -> list[Path]:
    """Existing model paths named by ``model:`` / ``base_model:`` lines, resolved against
    the recipe's folder (as the recipe loader does) or the working directory."""
    try:
        text = recipe.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    found: list[Path] = []
    for line in text.splitlines():
        m = _MODEL_LINE.match(line)
        if not m:
            continue
        name = m.group("path").strip().strip("'\"")
        for path in (recipe.parent / name, Path(name)):
            path = path.expanduser()
            if path.exists() and path not in found:
                found.append(path)
                break
    return found


def first_shard(model: Path) -> Path | None:
    """The safetensors file the engine reads first: the first of the shard index's files by
    name, else the first ``*.safetensors`` by name; the file itself for a file path."""
    if model.is_file():
        return model if model.suffix == ".safetensors" else None
    index = model / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return model / shards[0] if shards else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    files = sorted(p for p in model.glob("*.safetensors") if not p.name.startswith("."))
    return files[0] if files else None


def _cached(fd: int, offset: int) -> bool:
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "preadv"):
        return False
    try:
        return os.preadv(fd, [bytearray(1)], offset, flag) == 1
    except OSError:
        return False


class _FileHint:
    """The first ``end - start`` bytes of one file's tensor data, read into the page cache a
    chunk at a time."""

    def __init__(self, fd: int, key: FileKey, start: int, end: int):
        self.fd, self.key, self.end = fd, key, end
        self.first = start - start % BLOCK  # the recorded range starts on a block
        self.pos = start
        self.asked = False

    def advance(self, nbytes: int, sink: int) -> bool:
        """Read the next ``nbytes`` into the page cache (``sendfile`` to ``sink``, an open
        /dev/null: no copy to user space, the GIL released for the whole chunk);
        False when done (or refused). ``posix_fadvise(WILLNEED)`` would not do: Linux reads
        at most the device's read-ahead size (128 KB-8 MB) of each call, and each call
        would need the GIL, which the import holds."""
        stop = min(self.end, self.pos + nbytes)
        # recorded first: a merge that reads these bytes meanwhile shares the pages
        with _ranges_lock:
            _ranges[self.key] = (self.first, stop - stop % BLOCK)
        self.asked = True
        try:
            while self.pos < stop:
                sent = os.sendfile(sink, self.fd, self.pos, stop - self.pos)
                if sent <= 0:
                    return False
                self.pos += sent
        except OSError:
            return False
        return stop < self.end

    def run(self, nbytes: int, sink: int, until: threading.Event) -> None:
        while not until.is_set() and self.advance(nbytes, sink):
            pass


def _can_hint() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "sendfile")


def _open_hint(path: Path, nbytes: int) -> _FileHint | None:
    """The hint of ``path``'s first ``nbytes`` of tensor data (after its header), or None
    when there is nothing to read (not a safetensors file, already cached, not Linux)."""
    if not _can_hint() or nbytes <= 0:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        head = os.pread(fd, 8, 0)
        if len(head) == 8:
            start = 8 + struct.unpack("<Q", head)[0]
            length = min(nbytes, st.st_size - start)
            if length > 0 and not (_cached(fd, start) and _cached(fd, start + length - 1)):
                return _FileHint(fd, _key(st), start, start + length)
    except OSError:
        pass
    os.close(fd)
    return None


def _sink() -> int | None:
    try:
        return os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return None


def hint_file(path: Path, nbytes: int = HINT_BYTES) -> bool:
    """Read the first ``nbytes`` of tensor data of a safetensors file (after its header)
    into the page cache and record the range; True when something was read."""
    hint, sink = _open_hint(path, nbytes), _sink()
    try:
        if hint is not None and sink is not None:
            hint.advance(nbytes, sink)
            return hint.asked
        return False
    finally:
        for fd in (None if hint is None else hint.fd, sink):
            if fd is not None:
                os.close(fd)


def memory_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def hint_recipe(recipe: Path, nbytes: int = HINT_BYTES, total: int | None = None,
                until: threading.Event | None = None) -> int:
    """Read the first tensors of every model of ``recipe`` into the page cache, one thread
    per model (a disk serves several readers faster than one), ``CHUNK_BYTES`` at a time,
    up to ``nbytes`` per model and ``total`` over all (default ``HINT_TOTAL_MAX``, at most a
    quarter of the memory available), until ``until`` is set (default: the merge's first
    read, :func:`stop`); how many files were hinted."""
    until = _merge_started if until is None else until
    if total is None:
        available = memory_available()
        total = HINT_TOTAL_MAX if available is None else min(HINT_TOTAL_MAX, available // 4)
    shards = [s for s in (first_shard(m) for m in model_paths(recipe)) if s is not None]
    per_model = min(nbytes, total // max(1, len(shards)))
    hints = [h for h in (_open_hint(s, per_model) for s in shards) if h is not None]
    sink = _sink() if hints else None
    try:
        if sink is not None:
            threads = [threading.Thread(target=h.run, args=(CHUNK_BYTES, sink, until),
                                        daemon=True, name="modelalloy-early-hints-file")
                       for h in hints]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for fd in [h.fd for h in hints] + ([sink] if sink is not None else []):
            os.close(fd)
    return sum(h.asked for h in hints)


def start(argv: list[str] | None = None) -> threading.Thread | None:
    """On a ``merge`` command line, hint its recipe's first tensors from a daemon thread
    (the caller goes on to import torch); otherwise do nothing."""
    if os.environ.get("MODELALLOY_EARLY_HINTS", "1").strip().lower() in ("0", "false", "no",
                                                                          "off"):
        return None
    recipe = merge_recipe(sys.argv if argv is None else argv)
    if recipe is None:
        return None
    _merge_started.clear()
    thread = threading.Thread(target=hint_recipe, args=(recipe,), daemon=True,
                              name="modelalloy-early-hints")
    thread.start()
    return thread
