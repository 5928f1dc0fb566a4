"""Read checkpoints lazily: HF folders, single safetensors files, and state-dict pickles.

``open_checkpoint(path)`` accepts

* an HF model folder: ``model.safetensors``; sharded ``model-*.safetensors`` with
  ``model.safetensors.index.json``; ``pytorch_model.bin`` or sharded ``pytorch_model-*.bin``
  with ``pytorch_model.bin.index.json``; ``config.json`` is parsed when present;
* a single ``.safetensors`` file;
* a ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` state-dict file (``{"state_dict": ...}`` and
  ``{"model": ...}`` wrappers are unwrapped).

Everything is validated before it is trusted (see ``read_safetensors_header``), and every
problem is a one-line :class:`CheckpointError` that names the file (and tensor) and says
what to do. Pickles are only ever read with ``torch.load(weights_only=True)``: a pickle
that wants to run code is refused, never executed.

``Checkpoint.get`` returns one tensor at a time, in its stored dtype, on CPU, and may be
called from several threads at once. safetensors data is read with ``pread`` into memory the
caller owns (not memory-mapped, so RSS stays at the tensors in flight). ``read_direct`` reads a
tensor's bytes with ``O_DIRECT`` instead (no page cache: for inputs larger than RAM, see
docs/direct_io.md), falling back to the buffered reads where the filesystem refuses it.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import struct
import sys
import threading
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from modelalloy import early_hints
from modelalloy.errors import CheckpointError
from modelalloy.io.dtypes import SAFETENSORS_DTYPES, element_size
from modelalloy.io.safe_read import (
    CONFIG_LIMIT,
    INDEX_LIMIT,
    open_regular,
    parse_json,
    read_json_file,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Same cap as the safetensors library: a larger header is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000
_BIG_ENDIAN = sys.byteorder == "big"  # safetensors data is little-endian
# Wrapper keys that hold the real state dict in training checkpoints.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a stored tensor without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    file: Path


def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class _StEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int  # relative to the start of the data, as in the header
    end: int
    start: int  # absolute byte offset of the data in the file


def _no_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(
                    f"{path}: header lists tensor {k!r} twice; the file is corrupt, re-save it"
                )
            out[k] = v
        return out

    return hook


def read_safetensors_header(path: Path) -> tuple[list[_StEntry], dict[str, str]]:
    """Parse and validate a safetensors header; entries come back in data (file) order.

    Checks: the 8-byte little-endian header length fits in the file; the header is a JSON
    object; every entry has a known dtype, a shape of non-negative ints and
    ``data_offsets`` [begin, end] with ``end - begin == prod(shape) * itemsize``; ranges lie
    inside the file, do not overlap, leave no gaps and cover the data to the end of the file
    (as the safetensors library requires).
    """
    path = Path(path)
    fd = open_regular(path, CheckpointError, "the safetensors file")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: file is truncated ({size} bytes, no safetensors header); "
                "re-download or re-save it"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header length {n} is implausible (not a safetensors file, "
                "or corrupt); re-download or re-save it"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: file is truncated (header needs {8 + n} bytes, file has {size}); "
                "re-download it"
            )
        raw = _pread_exactly(fd, n, 8)
        if len(raw) < n:
            raise CheckpointError(f"{path}: file shrank while its header was read; re-download it")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({_one_line(e.strerror or e)})") from None
    finally:
        os.close(fd)
    header = parse_json(raw, str(path), CheckpointError, "the safetensors header",
                        object_pairs_hook=_no_duplicate_keys(path))
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; re-save the file")

    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object; re-save the file")
    if not all(isinstance(v, str) for v in metadata_raw.values()):
        raise CheckpointError(
            f"{path}: __metadata__ values must be strings (safetensors rule); re-save the file"
        )
    metadata = dict(metadata_raw)

    data_size = size - 8 - n
    entries: list[_StEntry] = []
    for name, spec in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: header entry is not an object; re-save the file")
        code = spec.get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{where}: unknown dtype {code!r}; convert the file to a supported dtype "
                f"({', '.join(sorted(SAFETENSORS_DTYPES))})"
            )
        dtype = SAFETENSORS_DTYPES[code]
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{where}: invalid shape {shape!r}; re-save the file")
        offsets = spec.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where}: invalid data_offsets {offsets!r}; re-save the file")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * element_size(dtype)
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: data_offsets span {end - begin} bytes but shape {shape} x {code} "
                f"needs {expected}; the file is corrupt, re-save it"
            )
        if end > data_size:
            raise CheckpointError(
                f"{where}: data ends at byte {8 + n + end} past the end of the file "
                f"({size} bytes); the file is truncated, re-download it"
            )
        entries.append(_StEntry(name, tuple(shape), dtype, begin, end, 8 + n + begin))

    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    prev = ""
    for entry in entries:
        if entry.begin < pos:
            raise CheckpointError(
                f"{path}: tensors {prev!r} and {entry.name!r} overlap in the file; "
                "the file is corrupt, re-save it"
            )
        if entry.begin > pos:
            raise CheckpointError(
                f"{path}: {entry.begin - pos} unindexed bytes before tensor {entry.name!r}; "
                "the file is corrupt, re-save it"
            )
        pos = entry.end
        prev = entry.name
    if pos != data_size:
        raise CheckpointError(
            f"{path}: {data_size - pos} bytes after the last tensor are not in the header; "
            "the file is corrupt or was appended to, re-save it"
        )
    return entries, metadata


def _pread_exactly(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = os.pread(fd, min(n - got, 1 << 24), offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# --------------------------------------------------------------------------- pickles


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a loaded pickle, unwrapping training wrappers."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; "
            "save model.state_dict() (preferably with safetensors) instead"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: state dict key {k!r} is not a string; re-save it")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                "save only model.state_dict() (preferably with safetensors)"
            )
        out[k] = v
    return out


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict of tensors from a pickle (:func:`load_pickle`, training wrappers
    unwrapped)."""
    return _unwrap_state_dict(load_pickle(path), path)


def load_pickle(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` of a regular file, memory-mapped when the file is a zip
    checkpoint: tensors, containers and plain values only (an optimizer state dict, a bare
    tensor); a pickle that wants to run code, or an unreadable file, is a one-line
    CheckpointError naming the file."""
    path = Path(path)
    # A FIFO would block the reads below: refuse anything but a regular file first, by name.
    os.close(open_regular(path, CheckpointError, "the PyTorch file"))
    use_mmap = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            m = re.search(r"GLOBAL (\S+)", msg)
            what = f" (it calls {m.group(1)})" if m else ""
            raise CheckpointError(
                f"refusing to execute code in pickle {path}{what}; convert it to safetensors "
                "in an environment you trust"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch file ({_one_line(msg, 120)}); "
            "re-download or re-save it"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch file ({_one_line(e, 120)}); re-download or re-save it"
        ) from None
    return obj


# --------------------------------------------------------------------------- folders


def _check_shard_name(name: object, index: Path) -> str:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map holds {name!r}, not a file name; fix the index")
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise CheckpointError(
                f"{index}: shard {name!r} is outside the model folder; refusing to read it, "
                "fix the index"
            )
    return name


def _read_index(index: Path) -> dict[str, str]:
    """weight_map of an HF shard index, in file order, shard names checked to stay inside."""
    data = read_json_file(index, INDEX_LIMIT, CheckpointError, "JSON shard index")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: has no weight_map; fix or re-download it")
    return {str(k): _check_shard_name(v, index) for k, v in wm.items()}


def _read_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not _present(cfg):
        return None
    data = read_json_file(cfg, CONFIG_LIMIT, CheckpointError, "config.json")
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: config.json is not a JSON object; fix or re-download it")
    return data


def _present(path: Path) -> bool:
    """Something is at ``path`` (a dangling link too: reading it then says so)."""
    return path.exists() or path.is_symlink()


def _visible(paths: list[Path]) -> list[Path]:
    # Non-regular entries (a FIFO, a folder named like a shard) stay: reading them refuses
    # them by name, where dropping them would lose their tensors without a word.
    return sorted(p for p in paths if not p.name.startswith("."))


def _find_weights(folder: Path) -> tuple[str, list[Path], Path | None]:
    """(kind, files, index) for a folder; kind is "safetensors" or "pickle"."""
    # Same preference order as transformers' from_pretrained: single file, then index. A
    # non-regular file under one of these names is taken (and then refused by name).
    if _present(folder / SAFETENSORS_SINGLE):
        return "safetensors", [folder / SAFETENSORS_SINGLE], None
    if _present(folder / SAFETENSORS_INDEX):
        return "safetensors", [], folder / SAFETENSORS_INDEX
    shards = _visible(list(folder.glob("model-*-of-*.safetensors")))
    if shards:
        return "safetensors", shards, None
    if _present(folder / BIN_SINGLE):
        return "pickle", [folder / BIN_SINGLE], None
    if _present(folder / BIN_INDEX):
        return "pickle", [], folder / BIN_INDEX
    shards = _visible(list(folder.glob("pytorch_model-*-of-*.bin")))
    if shards:
        return "pickle", shards, None
    anyst = _visible(list(folder.glob("*.safetensors")))
    if anyst:
        return "safetensors", anyst, None
    if not any(folder.iterdir()):
        raise CheckpointError(f"{folder}: folder is empty; point to a model folder with weights")
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, model-*.safetensors with "
        f"{SAFETENSORS_INDEX}, or pytorch_model.bin); point to a model folder"
    )


# --------------------------------------------------------------------------- Checkpoint


def _preadinto(fd: int, buf: memoryview, offset: int) -> int:
    """Read into ``buf`` at ``offset`` without moving a shared file position (thread-safe)."""
    if _HAS_PREADV:
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, min(len(buf), 1 << 30), offset)  # platforms without preadv: one copy
    buf[: len(data)] = data
    return len(data)


_HAS_PREADV = hasattr(os, "preadv")
_HAS_FADVISE = hasattr(os, "posix_fadvise")
# O_DIRECT transfers must start and end on the device's logical block and sit in memory aligned
# to it: 4096 is a multiple of every common block size (512, 4096); a filesystem that wants
# more refuses with EINVAL, and the reads fall back to the page cache.
DIRECT_ALIGN = 4096
HAS_DIRECT_IO = _HAS_PREADV and hasattr(os, "O_DIRECT") and not _BIG_ENDIAN


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose first byte is ``DIRECT_ALIGN``-aligned in memory
    (an O_DIRECT read target)."""
    raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % DIRECT_ALIGN
    return raw[skip:skip + nbytes]


def direct_span(offset: int, nbytes: int) -> tuple[int, int]:
    """(first, length) of the ``DIRECT_ALIGN``-aligned byte range that holds ``nbytes`` from
    ``offset`` of a file."""
    first = offset - offset % DIRECT_ALIGN
    end = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
    return first, end - first


def _cached(fd: int, offset: int) -> bool:
    """Whether the page holding byte ``offset`` is in the page cache: a one-byte read that
    fails rather than wait for the disk (``RWF_NOWAIT``; without it, say no)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not _HAS_PREADV:
        return False
    try:
        return os.preadv(fd, [bytearray(1)], offset, flag) == 1
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: the filesystem cannot tell
        return False


def _read_fully(fd: int, buf: memoryview, offset: int, info: TensorInfo) -> None:
    """Fill ``buf`` with the file's bytes from ``offset`` (part of tensor ``info``); a short
    file or a failed read is a one-line CheckpointError naming both."""
    pos = 0
    try:
        while pos < len(buf):
            got = _preadinto(fd, buf[pos:], offset + pos)
            if got <= 0:
                raise CheckpointError(
                    f"{info.file}: file ended inside tensor {info.name!r} (changed or "
                    "truncated after it was opened); re-download it")
            pos += got
    except OSError as e:
        raise CheckpointError(
            f"{info.file}: cannot read tensor {info.name!r} ({_one_line(e.strerror or e)})"
        ) from None


class Checkpoint:
    """A validated, lazily read set of tensors. ``get`` is thread-safe."""

    def __init__(
        self,
        path: Path,
        config: dict | None,
        infos: dict[str, TensorInfo],
        tensors: dict[str, torch.Tensor] | None = None,
        offsets: dict[str, int] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self._infos = infos
        self._tensors = tensors  # pickles: already (mmap-)loaded tensors
        self._offsets = offsets or {}  # safetensors: absolute data offset of each tensor
        self._fds: dict[Path, int] = {}  # safetensors: one read-only descriptor per file
        # safetensors: one O_DIRECT descriptor per file, None where the filesystem refuses it
        self._direct_fds: dict[Path, int | None] = {}
        self._stale: list[int] = []  # refused O_DIRECT descriptors, closed with the others
        self._readers = 0  # reads in flight (descriptors are closed when none is left)
        self._lock = threading.Lock()
        self._closed = False

    # -- queries
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: has no tensor {name!r}; check the tensor name or the model"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def files(self) -> list[Path]:
        """Weight files, in order of first use."""
        return list(dict.fromkeys(i.file for i in self._infos.values()))

    @property
    def direct_capable(self) -> bool:
        """Whether ``read_direct`` may serve this checkpoint (safetensors, O_DIRECT known)."""
        return self._tensors is None and HAS_DIRECT_IO

    @property
    def total_nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # -- reads
    def _acquire_fd(self, file: Path) -> int:
        """The descriptor for ``file``, counted as in use until ``_release``."""
        with self._lock:
            if self._closed:
                raise ValueError(f"checkpoint {self.path} is closed")
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(
                        f"{file}: cannot open ({_one_line(e.strerror or e)}); check the file"
                    ) from None
                self._fds[file] = fd
            self._readers += 1
            return fd

    def _acquire_direct_fd(self, file: Path) -> int | None:
        """The O_DIRECT descriptor for ``file`` (counted as in use until ``_release``), or
        None when the filesystem refuses direct I/O (tmpfs: EINVAL)."""
        with self._lock:
            if self._closed:
                raise ValueError(f"checkpoint {self.path} is closed")
            if file not in self._direct_fds:
                try:
                    self._direct_fds[file] = os.open(file, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise CheckpointError(
                            f"{file}: cannot open ({_one_line(e.strerror or e)}); check the file"
                        ) from None
                    self._direct_fds[file] = None
            fd = self._direct_fds[file]
            if fd is not None:
                self._readers += 1
            return fd

    def _refuse_direct(self, file: Path) -> None:
        """Read ``file`` through the page cache from now on (a direct read was refused)."""
        with self._lock:
            fd = self._direct_fds.get(file)
            self._direct_fds[file] = None
        if fd is not None:
            self._stale.append(fd)  # closed with the others: a read may still use it

    def _release(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._closed and self._readers == 0:
                self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = list(self._fds.values()), {}
        fds += [fd for fd in self._direct_fds.values() if fd is not None] + self._stale
        self._direct_fds, self._stale = {}, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, in its stored dtype, on the CPU. Thread-safe.

        safetensors data is read with ``os.preadv`` straight into a fresh tensor, so its
        memory is freed with the tensor. (A memory map would keep every page read so far
        resident: a process reading a 100 GB model would show 100 GB RSS.) The header was
        validated when the checkpoint was opened. Tensors from pickles are memory-mapped
        views (private: writing to them never reaches the file).

        ``out``: optionally a contiguous CPU tensor of the same shape and dtype to read into
        (a reused or pinned buffer); it is returned.
        """
        info = self.info(name)
        if out is not None:
            if (
                tuple(out.shape) != info.shape
                or out.dtype != info.dtype
                or out.device.type != "cpu"
                or not out.is_contiguous()
            ):
                raise ValueError(
                    f"out for {name!r} must be a contiguous CPU tensor {info.shape} "
                    f"{info.dtype}, got {tuple(out.shape)} {out.dtype} on {out.device}"
                )
        if self._tensors is not None:
            if self._closed:
                raise ValueError(f"checkpoint {self.path} is closed")
            t = self._tensors[name]
            return t if out is None else out.copy_(t)
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        return self._read_into(name, info, out, 0)

    def prefetch(self, name: str) -> bool:
        """Start reading tensor ``name`` into the page cache without waiting for it
        (``posix_fadvise(WILLNEED)``), unless its first and last pages are there already;
        True when a read was asked for. Best effort: a failed hint changes nothing. While
        the engine merges some tensors it hints the next few, so on a cold cache the disk
        keeps reading instead of waiting for each ``get`` (one in-memory probe per end,
        ``RWF_NOWAIT``, keeps warm merges from walking pages that are cached). The command's
        early hints stop here: the engine's own take over."""
        early_hints.stop()
        info = self._infos.get(name)
        if self._tensors is not None or info is None or info.nbytes == 0 or not _HAS_FADVISE:
            return False
        offset = self._offsets[name]
        try:
            fd = self._acquire_fd(info.file)
        except (CheckpointError, ValueError):  # closed, or the file is gone: get will say
            return False
        try:
            if _cached(fd, offset) and _cached(fd, offset + info.nbytes - 1):
                return False
            os.posix_fadvise(fd, offset, info.nbytes, os.POSIX_FADV_WILLNEED)
            return True
        except OSError:
            return False
        finally:
            self._release()

    def get_slice(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. start + out.numel()`` of the flattened tensor, read into ``out``
        (a contiguous 1-D CPU buffer of the stored dtype, reused across calls). Thread-safe."""
        info = self.info(name)
        count = out.numel()
        numel = info.nbytes // max(1, info.dtype.itemsize)
        if out.dtype != info.dtype or out.dim() != 1 or not out.is_contiguous() \
                or start < 0 or start + count > numel:
            raise ValueError(f"slice [{start}, {start + count}) of {name!r} ({numel} elements, "
                             f"{info.dtype}) does not fit a {out.dtype} buffer of {count}")
        if self._tensors is not None:
            if self._closed:
                raise ValueError(f"checkpoint {self.path} is closed")
            return out.copy_(self._tensors[name].reshape(-1)[start:start + count])
        return self._read_into(name, info, out, start * info.dtype.itemsize)

    def _read_into(self, name: str, info: TensorInfo, out: torch.Tensor,
                   skip: int) -> torch.Tensor:
        """Fill ``out`` with the tensor's bytes from ``skip`` bytes into its data."""
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return out
        buf = out.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        offset = self._offsets[name] + skip
        fd = self._acquire_fd(info.file)
        try:
            _read_fully(fd, buf, offset, info)
        finally:
            self._release()
        if _BIG_ENDIAN and out.element_size() > 1:
            size = out.element_size()
            flipped = out.reshape(-1).view(torch.uint8).reshape(-1, size).flip(-1)
            out.reshape(-1).view(torch.uint8).copy_(flipped.reshape(-1))
        return out

    def data_offset(self, name: str) -> int:
        """The file offset of tensor ``name``'s first byte (where ``read_direct``'s block
        alignment falls inside it)."""
        self.info(name)  # a clear error for an unknown name
        return self._offsets[name]

    def read_direct(self, name: str, skip: int, nbytes: int, into: torch.Tensor) -> int | None:
        """Read bytes ``skip .. skip + nbytes`` of tensor ``name``'s data with ``O_DIRECT`` (no
        page cache: no copy through it, no reclaim of it): the ``DIRECT_ALIGN``-aligned range
        that holds them goes into ``into`` (an :func:`aligned_buffer` of at least
        ``direct_span``'s length), and the offset of byte ``skip`` in ``into`` is returned.
        None when this file cannot be read so (a pickle, a filesystem that refuses O_DIRECT,
        a platform without it): read it with ``get_slice`` instead, the same bytes.
        Thread-safe.

        The part of the range that the command's early hints asked the kernel for while
        torch imported (``early_hints.hinted_range``) is read through the page cache, where
        it is, and its pages are dropped after (``DONTNEED``): reading it with O_DIRECT would
        read it from the disk a second time."""
        early_hints.stop()
        info = self.info(name)
        if skip < 0 or nbytes < 0 or skip + nbytes > info.nbytes:
            raise ValueError(f"bytes [{skip}, {skip + nbytes}) are not inside tensor {name!r} "
                             f"({info.nbytes} bytes)")
        if self._tensors is not None or not HAS_DIRECT_IO:
            return None
        first, length = direct_span(self._offsets[name] + skip, nbytes)
        if into.dtype != torch.uint8 or into.numel() < length or into.data_ptr() % DIRECT_ALIGN:
            raise ValueError(f"direct read of {name!r} needs an aligned uint8 buffer of "
                             f"{length} bytes, got {into.numel()} {into.dtype}")
        wanted = (self._offsets[name] + skip, self._offsets[name] + skip + nbytes)
        buf = into.numpy().data.cast("B")
        fd = self._acquire_direct_fd(info.file)
        if fd is None:
            return None
        try:
            hinted = early_hints.hinted_range(fd)
            # [first, low) directly, [low, high) through the page cache, [high, ...) directly
            low = high = first
            if hinted is not None and hinted[0] < first + length and first < hinted[1]:
                low, high = max(first, hinted[0]), min(first + length, hinted[1])
                if not self._read_hinted(info, buf[low - first:high - first], low, wanted):
                    low = high = first  # not to be read so after all: all of it directly
            for start, stop in ((first, low), (high, first + length)):
                if start < min(stop, wanted[1]) and not self._read_direct_part(
                        fd, info, buf[start - first:stop - first], start,
                        min(stop, wanted[1]) - start):
                    self._refuse_direct(info.file)
                    return None
        finally:
            self._release()
        return wanted[0] - first

    def _read_direct_part(self, fd: int, info: TensorInfo, buf: memoryview, offset: int,
                          need: int) -> bool:
        """Fill ``buf`` from ``offset`` of the O_DIRECT descriptor ``fd``, of which ``need``
        bytes must arrive (the rest may lie past the end of the file); False when the
        filesystem refuses (EINVAL before anything was read)."""
        pos = 0
        try:
            while pos < need:
                got = os.preadv(fd, [buf[pos:]], offset + pos)
                # a direct read stops short only at the end of the file (or of the range)
                if got <= 0 or (got % DIRECT_ALIGN and pos + got < need):
                    raise CheckpointError(
                        f"{info.file}: file ended inside tensor {info.name!r} (changed or "
                        "truncated after it was opened); re-download it")
                pos += got
        except OSError as e:
            if e.errno == errno.EINVAL and pos == 0:  # alignment or flag refused
                return False
            raise CheckpointError(
                f"{info.file}: cannot read tensor {info.name!r} ({_one_line(e.strerror or e)})"
            ) from None
        return True

    def _read_hinted(self, info: TensorInfo, buf: memoryview, offset: int,
                     wanted: tuple[int, int]) -> bool:
        """Fill ``buf`` from ``offset`` through the page cache (the early hints' pages), then
        drop the pages that hold only ``wanted`` bytes (the blocks at either end may hold a
        neighbour's, which reads them next); False when the file cannot be opened so."""
        try:
            fd = self._acquire_fd(info.file)
        except (CheckpointError, ValueError):
            return False
        try:
            _read_fully(fd, buf, offset, info)
            drop_from = max(offset, -(-wanted[0] // DIRECT_ALIGN) * DIRECT_ALIGN)
            drop_to = min(offset + len(buf), wanted[1] - wanted[1] % DIRECT_ALIGN)
            if _HAS_FADVISE and drop_from < drop_to:
                try:
                    os.posix_fadvise(fd, drop_from, drop_to - drop_from,
                                     os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass
            return True
        finally:
            self._release()

    def close(self) -> None:
        """Release the files. Reads in flight in other threads finish first."""
        with self._lock:
            self._closed = True
            if self._tensors is not None:
                self._tensors = {}
            if self._readers == 0:
                self._close_fds()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._infos)} tensors)"


def _st_infos(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    for file in files:
        entries, _ = read_safetensors_header(file)
        for e in entries:
            if e.name in infos:
                raise CheckpointError(
                    f"tensor {e.name!r} is in both {infos[e.name].file} and {file}; "
                    "remove the duplicate shard or fix the model folder"
                )
            infos[e.name] = TensorInfo(e.name, e.shape, e.dtype, e.end - e.begin, file)
            offsets[e.name] = e.start
    return infos, offsets


def _pickle_load(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, torch.Tensor]]:
    infos: dict[str, TensorInfo] = {}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, t in load_pickle_state_dict(file).items():
            if name in infos:
                raise CheckpointError(
                    f"tensor {name!r} is in both {infos[name].file} and {file}; "
                    "remove the duplicate shard or fix the model folder"
                )
            infos[name] = TensorInfo(
                name, tuple(t.shape), t.dtype, t.numel() * t.element_size(), file
            )
            tensors[name] = t
    return infos, tensors


def _apply_index(
    folder: Path, index: Path, weight_map: dict[str, str], found: dict[str, TensorInfo]
) -> None:
    """Check that the shards hold exactly what the index says."""
    for name, shard in weight_map.items():
        info = found.get(name)
        if info is None:
            raise CheckpointError(
                f"{index}: tensor {name!r} should be in {shard} but no shard has it; "
                "re-download the model"
            )
        if info.file != folder / shard:
            raise CheckpointError(
                f"{index}: says tensor {name!r} is in {shard} but it is in {info.file.name}; "
                "fix or regenerate the index"
            )
    extra = [n for n in found if n not in weight_map]
    if extra:
        raise CheckpointError(
            f"{index}: tensor {extra[0]!r} in {found[extra[0]].file.name} is not in the index "
            f"({len(extra)} such tensors); fix or regenerate the index"
        )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model folder or weight file; validates everything up front, reads nothing big."""
    user_path = Path(path)
    if "\0" in str(user_path):
        raise CheckpointError(f"{str(user_path)!r}: a path cannot hold a NUL byte; fix the path")
    p = user_path.expanduser()
    if not p.exists():
        hint = ""
        if isinstance(path, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            hint = f" (a Hugging Face id? download it first: huggingface-cli download {path})"
        raise CheckpointError(f"{user_path}: no such file or folder; check the path{hint}")

    if p.is_dir():
        config = _read_config(p)
        kind, files, index = _find_weights(p)
        weight_map: dict[str, str] | None = None
        if index is not None:
            weight_map = _read_index(index)
            files = []
            # Storage order (shard by shard, data order inside), not the index's (usually
            # alphabetical) order: reads then stream through each file once, front to back.
            for shard in sorted(set(weight_map.values())):
                f = p / shard
                if not _present(f):  # a FIFO or folder in its place is refused when read
                    raise CheckpointError(
                        f"{index}: shard {shard} is missing from {p}; re-download the model"
                    )
                files.append(f)
        offsets: dict[str, int] | None = None
        tensors: dict[str, torch.Tensor] | None = None
        if kind == "safetensors":
            infos, offsets = _st_infos(files)
        else:
            infos, tensors = _pickle_load(files)
        if index is not None and weight_map is not None:
            _apply_index(p, index, weight_map, infos)
        return Checkpoint(user_path, config, infos, tensors, offsets)

    if not p.is_file():
        raise CheckpointError(f"{user_path}: not a regular file or folder; point to a model")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        infos, offsets = _st_infos([p])
        return Checkpoint(user_path, None, infos, offsets=offsets)
    if suffix in PICKLE_SUFFIXES:
        infos, tensors = _pickle_load([p])
        return Checkpoint(user_path, None, infos, tensors)
    if suffix == ".json" and p.name.endswith(".index.json"):
        raise CheckpointError(f"{user_path}: is a shard index; point to the folder that holds it")
    raise CheckpointError(
        f"{user_path}: unsupported file type {p.suffix or '(none)'}; use a model folder, "
        "a .safetensors file, or a .bin/.pt/.pth state dict"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder or weight file, through ``open_checkpoint``'s checks
    (regular files only, headers and sizes validated, pickles without code); a truncated or
    corrupt file is a one-line :class:`CheckpointError` naming it."""
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.names()}
