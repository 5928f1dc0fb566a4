"""bundle.json: what a TALL bundle holds, checked before a byte of it is trusted.

A bundle is rebuilt into experts long after it was written, maybe copied between machines:
a truncated mask file or an edited shape would otherwise rebuild a silently wrong expert.
So ``bundle.json`` lists every file of the bundle with its size and SHA-256, and the reader
checks the manifest's structure, then every file (no file missing, none added, none
changed), then that the tensors agree with the recorded shapes.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from modelalloy.errors import CheckpointError
from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.safe_read import open_regular, read_json_file

FORMAT = "modelalloy.tall_bundle/3"
MANIFEST = "bundle.json"
PARTS = ("base", "merged", "masks")
_MANIFEST_LIMIT = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a regular file, read in 1 MiB blocks."""
    fd = open_regular(path, CheckpointError, "a bundle file")
    digest, size = hashlib.sha256(), 0
    try:
        while block := os.read(fd, 1 << 20):
            digest.update(block)
            size += len(block)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def _bundle_files(root: Path) -> list[str]:
    """Every file under the bundle's parts, as POSIX paths relative to ``root``."""
    out = []
    for part in PARTS:
        for folder, _dirs, files in os.walk(root / part):
            for name in files:
                out.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(out)


def describe_files(root: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` section of a manifest for the bundle being written in ``root``."""
    out = {}
    for rel in _bundle_files(root):
        size, sha = file_digest(root / rel)
        out[rel] = {"size": size, "sha256": sha}
    return out


def _fail(root: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{root / MANIFEST}: {problem}; the bundle is damaged or was "
                           "edited, re-run `modelalloy compress`")


def _is_int(x: object, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_manifest(root: Path, config_fields: Collection[str]) -> dict[str, Any]:
    """Load and check ``root/bundle.json``'s structure (not yet the files: :func:`verify_files`);
    ``config_fields``: the keys its ``config`` must have."""
    path = root / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{root}: not a TALL bundle (no {MANIFEST})")
    meta = read_json_file(path, _MANIFEST_LIMIT, CheckpointError, MANIFEST)
    if not isinstance(meta, dict):
        raise _fail(root, "is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{root}: bundle format {meta.get('format')!r} is not "
                              f"{FORMAT!r}; re-run `modelalloy compress`")
    for key in ("tasks", "config", "shapes", "files"):
        if key not in meta:
            raise _fail(root, f"has no '{key}'")
    tasks = meta["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(
            isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
        raise _fail(root, "'tasks' is not a list of distinct task names")
    cfg = meta["config"]
    if not isinstance(cfg, dict) or set(cfg) != set(config_fields):
        raise _fail(root, f"'config' must have exactly {', '.join(sorted(config_fields))}")
    lambdas = cfg["mask_lambda"]
    if not isinstance(lambdas, list) or len(lambdas) != len(tasks) or not all(
            _is_number(x) for x in lambdas):
        raise _fail(root, "'config.mask_lambda' is not one number per task")
    if not _is_number(cfg["density"]) or not isinstance(cfg["base_merge"], str) \
            or not isinstance(cfg["scope"], str):
        raise _fail(root, "'config' holds a value of the wrong type")
    shapes = meta["shapes"]
    if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and all(_is_int(d) for d in s) for s in shapes.values()):
        raise _fail(root, "'shapes' is not a map of tensor names to shapes")
    files = meta["files"]
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and _is_int(v.get("size")) and isinstance(v.get("sha256"), str)
            and _SHA256.fullmatch(v["sha256"]) for v in files.values()):
        raise _fail(root, "'files' is not a map of file names to sizes and SHA-256 sums")
    for rel in files:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or pure.parts[:1] not in [(p,) for p in
                                                                             PARTS]:
            raise _fail(root, f"lists the file {rel!r} outside the bundle's parts")
    return meta


def verify_files(root: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Every listed file is there with its size and SHA-256, and no other file is."""
    present = _bundle_files(root)
    extra = sorted(set(present) - set(files))
    if extra:
        raise _fail(root, f"does not list {extra[0]} (a file added to the bundle)")
    for rel, want in files.items():
        path = root / rel
        if not path.exists():
            raise _fail(root, f"lists {rel}, which is missing")
        size, sha = file_digest(path)
        if size != want["size"]:
            raise _fail(root, f"{rel} is {size} bytes, the manifest says {want['size']}")
        if sha != want["sha256"]:
            raise _fail(root, f"{rel} does not match its SHA-256 sum")


def verify_tensors(root: Path, tasks: list[str], shapes: Mapping[str, tuple[int, ...]],
                   base: Checkpoint, merged: Checkpoint, masks: Checkpoint) -> None:
    """The parts hold exactly the tensors the recorded shapes call for."""
    import torch

    if set(merged.names()) != set(shapes):
        raise _fail(root, "the merged task vector's tensors differ from 'shapes'")
    want_masks = {f"{i}/{n}" for i in range(len(tasks)) for n in shapes}
    if set(masks.names()) != want_masks:
        raise _fail(root, "the mask tensors differ from 'tasks' x 'shapes'")
    for name, shape in shapes.items():
        if name not in base or base.info(name).shape != shape:
            raise _fail(root, f"tensor '{name}' is {list(shape)} in 'shapes' but the base "
                        "disagrees")
        if merged.info(name).shape != shape:
            raise _fail(root, f"tensor '{name}' has another shape in merged/")
        packed = (math.ceil(math.prod(shape) / 8),)
        for i in range(len(tasks)):
            info = masks.info(f"{i}/{name}")
            if info.shape != packed or info.dtype != torch.uint8:
                raise _fail(root, f"mask {i}/{name} is {list(info.shape)} {info.dtype}, not "
                            f"{list(packed)} uint8")
