"""Start reading a merge's first tensors while torch imports (standard library only).

Importing torch takes about a second of every `modelalloy merge`, with the disk idle. On a
cold page cache (models larger than RAM, or just downloaded) the first tensors can be on their
way meanwhile: ``modelalloy/__init__`` calls :func:`start` before it imports torch, and when
the process is the ``merge`` command a daemon thread asks the kernel to read
(``posix_fadvise(WILLNEED)``) the first ``HINT_BYTES`` of tensor data of every model the
recipe names. The engine merges in storage order (the reference model's first shard, data
order), so those are the first tensors it reads; its own hints take over from there
(``Checkpoint.prefetch``).

Best effort and cheap: model paths are found in the recipe text with a pattern (no YAML or
torch import), anything unexpected skips the hint, pages already cached (a one-byte
``RWF_NOWAIT`` probe at both ends) are not hinted, and ``MODELALLOY_EARLY_HINTS=0`` turns it
off. The merge itself validates everything as before.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
from pathlib import Path

HINT_BYTES = 256 << 20  # per model: a second of cold reads on a 1-2 GB/s disk for 4 models
_MODEL_LINE = re.compile(r"^\s*(?:-\s*)?(?:base_model|model)\s*:\s*(?P<path>[^#{}\[\],]+?)\s*"
                         r"(?:#.*)?$")


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


def hint_file(path: Path, nbytes: int = HINT_BYTES) -> bool:
    """Ask the kernel to read the first ``nbytes`` of tensor data of a safetensors file
    (after its header); True when a read was asked for."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            return False
        start = 8 + struct.unpack("<Q", head)[0]
        length = min(nbytes, size - start)
        if length <= 0 or (_cached(fd, start) and _cached(fd, start + length - 1)):
            return False
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def hint_recipe(recipe: Path, nbytes: int = HINT_BYTES) -> int:
    """Hint the first tensors of every model of ``recipe``; how many files were hinted."""
    hinted = 0
    for model in model_paths(recipe):
        shard = first_shard(model)
        if shard is not None and hint_file(shard, nbytes):
            hinted += 1
    return hinted


def start(argv: list[str] | None = None) -> threading.Thread | None:
    """On a ``merge`` command line, hint its recipe's first tensors from a daemon thread
    (the caller goes on to import torch); otherwise do nothing."""
    if os.environ.get("MODELALLOY_EARLY_HINTS", "1").strip().lower() in ("0", "false", "no",
                                                                          "off"):
        return None
    recipe = merge_recipe(sys.argv if argv is None else argv)
    if recipe is None:
        return None
    thread = threading.Thread(target=hint_recipe, args=(recipe,), daemon=True,
                              name="modelalloy-early-hints")
    thread.start()
    return thread
