"""Output side: output-path checks, atomic output folder, sharded safetensors writer.

Nothing half-written: the engine writes into ``AtomicOutputDir(...).path`` (a temporary
sibling ``.<name>.tmp-<random>``), which is renamed onto the output path only when the
``with`` block ends cleanly; on any exception, Ctrl-C included, it is removed.

``ShardedSafetensorsWriter`` lays out every shard up front from the known names, shapes and
dtypes, writes each file's header and preallocates it, then accepts tensors in any order from
any number of threads (``os.pwrite`` at precomputed offsets). The bytes on disk do not
depend on the order of writes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelalloy.errors import OutputError
from modelalloy.io.atomic_dir import (  # noqa: F401 - AtomicOutputDir is re-exported
    AtomicOutputDir,
    display_path,
    fsync_path,
    human_size,
    recover_leftovers,
)
from modelalloy.io.checkpoint import HAS_DIRECT_IO
from modelalloy.io.direct_writes import DirectWrites
from modelalloy.io.dtypes import element_size, safetensors_code
from modelalloy.io.faults import fault_point

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# --------------------------------------------------------------------------- sizes

_UNITS = {
    "": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2_147_483_648, ``"500MB"``, ``1000`` -> bytes.

    Decimal units (K/KB, M/MB, G/GB, T/TB) are powers of 1000, binary ones (KiB, MiB, GiB,
    TiB) powers of 1024, case-insensitive; a bare number is bytes. A bare ``B`` suffix
    is refused: mergekit reads ``5B`` as five *billion* bytes, most tools as five bytes.
    """
    if isinstance(text, bool):
        raise ValueError(f"size must be a number of bytes or a string like '5GB', got {text!r}")
    if isinstance(text, int):
        value = text
    elif isinstance(text, str):
        s = text.strip().replace("_", "")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", s)
        if not m:
            raise ValueError(f"invalid size {text!r}; write e.g. '5GB', '500MB', '2GiB' or 1000")
        number, unit = m.group(1), m.group(2).lower()
        if unit == "b":
            raise ValueError(
                f"ambiguous size {text!r}: 'B' means bytes to most tools but billions to "
                f"mergekit; write '{number}GB' for {number} billion bytes or '{number}' for bytes"
            )
        if unit not in _UNITS:
            raise ValueError(
                f"invalid size unit {m.group(2)!r} in {text!r}; use KB, MB, GB, TB, "
                "KiB, MiB, GiB or TiB"
            )
        value = (
            math.floor(float(number) * _UNITS[unit])
            if "." in number
            else int(number) * _UNITS[unit]
        )
    else:
        raise ValueError(f"size must be a number of bytes or a string like '5GB', got {text!r}")
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


# --------------------------------------------------------------------------- output paths


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_path(out_dir: Path, inputs: list[Path], force: bool) -> None:
    """Refuse output paths that would lose data or cannot work, before any work is done.

    OutputError when ``out_dir`` is a file; exists and ``force`` is false; is, contains or
    lies inside one of the inputs; is the current directory, the home folder, a filesystem
    root or an ancestor of the current directory; or its parent cannot be written.
    """
    out = Path(out_dir).expanduser()
    if "\0" in str(out):
        raise OutputError(f"{str(out)!r}: a path cannot hold a NUL byte; choose another path")
    recover_leftovers(out)  # a half-done swap of this output is finished or undone first
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: is a file or a link, not a folder; choose another output path")
    res = out.resolve()
    for inp in inputs:
        ip = Path(inp).expanduser().resolve()
        if res == ip:
            raise OutputError(f"{out}: is the input {inp}; choose another output path")
        if _inside(ip, res):
            raise OutputError(f"{out}: contains the input {inp}; choose another output path")
        if _inside(res, ip):
            raise OutputError(f"{out}: is inside the input {inp}; choose another output path")
        # An input file's folder: writing next to it is fine, replacing it is not.
        if ip.is_file() and res == ip.parent:
            raise OutputError(f"{out}: holds the input {inp}; choose another output path")
    cwd = Path.cwd().resolve()
    if _inside(cwd, res) or res == Path.home().resolve() or res == Path(res.anchor):
        raise OutputError(
            f"{out}: is the current, home or root folder (or holds it); choose a new folder"
        )
    if out.exists() and not force:
        raise OutputError(
            f"{out}: already exists; pass force=True to replace it or choose another path",
            options=("force",))
    parent = res.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: {parent} is a file, not a folder; choose another output path")
    # A real probe rather than os.access: root passes access checks on read-only mounts.
    try:
        probe = tempfile.mkdtemp(prefix=".modelalloy-probe-", dir=parent)
    except OSError:
        raise OutputError(f"{out}: cannot write to {parent}; choose a writable location") \
            from None
    os.rmdir(probe)


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _shard_name(i: int, n: int) -> str:
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# Largest single write call. Buffered writes hold the file's inode lock while they copy: with
# tensor-sized calls the other merge threads writing to the same shard spin on that lock
# (a 1B dare_ties merge spent 4 s of CPU in the kernel that way; 1 MiB calls removed it).
_WRITE_CHUNK = 1 << 20


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data[:_WRITE_CHUNK], offset)
        if n <= 0:
            raise OSError("short write")
        data = data[n:]
        offset += n


class ShardedSafetensorsWriter:
    """Write a known set of tensors into standard safetensors shards, in any order, threaded.

    We write the safetensors headers ourselves because ``safetensors.torch.save_file`` needs a
    whole shard in memory at once; here each tensor goes to disk as soon as it is merged, so
    memory holds only the tensors in flight. The files are standard safetensors (header JSON
    with ``__metadata__`` {"format": "pt"}, padded with spaces to a multiple of 8, data packed
    with no gaps) and load with ``safe_open`` and ``from_pretrained``.

    Layout: tensors are assigned to shards in the given order, starting a new shard when the
    next tensor would take the current one past ``shard_size`` (a tensor larger than
    ``shard_size`` gets a shard of its own). Inside a shard, data is ordered by decreasing
    element size (stable), so every tensor starts at an offset aligned to its element size.
    """

    def __init__(
        self,
        folder: Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        shard_size: int,
        metadata: dict[str, str] | None = None,
        direct: bool = False,
    ) -> None:
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.folder = Path(folder)
        meta = {"format": "pt"}
        for k, v in (metadata or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
            meta[k] = v
        meta["format"] = "pt"

        # 1. assign shards in the given order
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        seen: set[str] = set()
        for name, shape, dtype in entries:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in the writer entries")
            seen.add(name)
            shape = tuple(int(d) for d in shape)
            safetensors_code(dtype)  # raises for dtypes safetensors cannot hold
            nbytes = math.prod(shape) * element_size(dtype)
            if groups[-1] and used + nbytes > shard_size:
                groups.append([])
                used = 0
            groups[-1].append((name, shape, dtype, nbytes))
            used += nbytes
        n = len(groups)
        self.shard_names = [_shard_name(i, n) for i in range(n)]

        # 2. per shard: data order, offsets, header
        self._slots: dict[str, _Slot] = {}
        self._headers: list[bytes] = []
        self._sizes: list[int] = []
        for i, group in enumerate(groups):
            order = sorted(range(len(group)), key=lambda j: -element_size(group[j][2]))
            header: dict[str, object] = {"__metadata__": meta}
            rel = 0
            placed = []
            for j in order:
                name, shape, dtype, nbytes = group[j]
                header[name] = {
                    "dtype": safetensors_code(dtype),
                    "shape": list(shape),
                    "data_offsets": [rel, rel + nbytes],
                }
                placed.append((name, shape, dtype, nbytes, rel))
                rel += nbytes
            raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            prefix = len(raw).to_bytes(8, "little") + raw
            self._headers.append(prefix)
            self._sizes.append(len(prefix) + rel)
            for name, shape, dtype, nbytes, r in placed:
                self._slots[name] = _Slot(i, len(prefix) + r, nbytes, shape, dtype)
        self.weight_map = {
            name: self.shard_names[self._slots[name].shard] for name, _, _ in entries
        }
        self.total_size = sum(s.nbytes for s in self._slots.values())

        # 3. create and preallocate the files
        self._lock = threading.Lock()
        self._claimed: set[str] = set()  # write started (a second write fails fast)
        self._written: set[str] = set()  # write finished
        self._fds: list[int] = []
        self._direct: DirectWrites | None = None
        self._closed = False
        needed = sum(self._sizes)
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            free = None
        shown = display_path(self.folder)
        if free is not None and needed > free:
            raise OutputError(
                f"{shown}: needs {human_size(needed)}, only {human_size(free)} free on its "
                "disk; free some space or choose another output path"
            )
        try:
            for name, size, prefix in zip(
                self.shard_names, self._sizes, self._headers, strict=True
            ):
                fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _preallocate(fd, size)
                _pwrite_all(fd, memoryview(prefix), 0)
            if direct and HAS_DIRECT_IO:
                self._direct = DirectWrites([self.folder / n for n in self.shard_names],
                                            self._fds, _pwrite_all)
        except OSError as e:
            self.abort()
            raise OutputError(f"{shown}: cannot create the output files ({e.strerror or e}; "
                              f"{human_size(needed)} needed)") from None

    @property
    def files(self) -> list[Path]:
        return [self.folder / n for n in self.shard_names]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (already in its output dtype, on CPU) at its place. Thread-safe."""
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} is not in the output layout")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, the layout says "
                f"{slot.shape} {slot.dtype}"
            )
        self.begin(name)
        try:
            self.write_part(name, 0, tensor)
        except BaseException:
            self.abandon(name)
            raise
        self.end(name)

    def begin(self, name: str) -> None:
        """Claim ``name`` for writing in parts (``write_part``, then ``end``). Thread-safe."""
        if name not in self._slots:
            raise ValueError(f"tensor {name!r} is not in the output layout")
        with self._lock:
            if self._closed:
                raise ValueError("the writer is closed")
            if name in self._claimed:
                raise ValueError(f"tensor {name!r} was already written")
            self._claimed.add(name)
        if self._direct is not None:
            slot = self._slots[name]
            self._direct.begin(name, slot.shard, slot.offset, slot.nbytes)

    def write_part(self, name: str, start: int, part: torch.Tensor) -> None:
        """Write ``part`` (CPU, the output dtype) as elements ``start ..`` of the flattened
        tensor ``name``, which ``begin`` claimed. Parts may come in any order."""
        slot = self._slots[name]
        if part.dtype != slot.dtype or part.device.type != "cpu":
            raise ValueError(f"tensor {name!r}: got a {part.dtype} part on {part.device}, the "
                             f"layout says {slot.dtype} on the CPU")
        size = element_size(slot.dtype)
        skip, nbytes = start * size, part.numel() * size
        if name not in self._claimed or start < 0 or skip + nbytes > slot.nbytes:
            raise ValueError(f"tensor {name!r}: part [{start}, {start + part.numel()}) is "
                             "outside the tensor or the tensor was not begun")
        if nbytes:
            data = (part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                    .data.cast("B"))
            try:
                fault_point("writer.write")
                if self._direct is not None:
                    self._direct.write(name, slot.shard, slot.offset + skip, data)
                else:
                    _pwrite_all(self._fds[slot.shard], data, slot.offset + skip)
            except OSError as e:
                raise OutputError(
                    f"{display_path(self.folder / self.shard_names[slot.shard])}: cannot "
                    f"write tensor {name!r} ({e.strerror or e}); check free disk space"
                ) from None

    def end(self, name: str) -> None:
        """Mark ``name`` written, and start writing it back to disk in the background so
        that ``close``'s fsync has little left to wait for."""
        slot = self._slots[name]
        if self._direct is not None:
            try:
                self._direct.end(name, slot.shard)
            except OSError as e:
                raise OutputError(
                    f"{display_path(self.folder / self.shard_names[slot.shard])}: cannot "
                    f"write tensor {name!r} ({e.strerror or e}); check free disk space"
                ) from None
        with self._lock:
            self._written.add(name)
            fd = self._fds[slot.shard] if not self._closed else None
        if fd is not None and slot.nbytes >= _WRITEBACK_MIN_BYTES:
            _start_writeback(fd, slot.offset, slot.nbytes)

    def abandon(self, name: str) -> None:
        """Release a claim whose parts will not all come (the tensor may be written again)."""
        if self._direct is not None:
            self._direct.abandon(name)
        with self._lock:
            self._claimed.discard(name)

    def close(self) -> list[Path]:
        """Check every tensor was written, fsync, write the index; return the files written."""
        with self._lock:
            if self._closed:
                raise ValueError("the writer is already closed")
            busy = self._claimed - self._written
            if busy:
                raise ValueError(
                    f"{len(busy)} tensors are still being written, e.g. {min(busy)!r}; "
                    "close the writer after every write() has returned"
                )
            missing = [n for n in self._slots if n not in self._written]
            if missing:
                raise ValueError(f"{len(missing)} tensors were never written, e.g. {missing[0]!r}")
            self._closed = True
        try:
            fault_point("writer.close")
            for fd in self._fds:
                os.fsync(fd)
            files = self.files
            if len(self.shard_names) > 1:
                index = {"metadata": {"total_size": self.total_size},
                         "weight_map": self.weight_map}
                path = self.folder / INDEX_NAME
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(index, f, indent=2)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                files.append(path)
        except OSError as e:
            # A full disk shows here on filesystems that could not reserve the space up front
            # (fsync reports the failed writeback), or when the index no longer fits.
            raise OutputError(
                f"{display_path(self.folder)}: cannot finish writing the output "
                f"({e.strerror or e}; {human_size(sum(self._sizes))} of shards); check free "
                "disk space and try again"
            ) from None
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            if self._direct is not None:
                self._direct.close()
        fsync_path(self.folder)
        return files

    def abort(self) -> None:
        """Close the files without checks (the output folder is about to be removed)."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, []
        if self._direct is not None:
            self._direct.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _preallocate(fd: int, size: int) -> None:
    """Set the file size and, where the filesystem supports it, reserve the blocks.

    Linux ``fallocate(2)`` reserves the space at once (a full disk fails here, not halfway
    through a merge). We call it directly rather than ``os.posix_fallocate``, whose glibc
    fallback on filesystems without fallocate writes every block and is slow for large models;
    without support the file is simply sparse until written.
    """
    os.ftruncate(fd, size)
    if size and _fallocate is not None:
        if _fallocate(fd, 0, 0, ctypes.c_int64(size)) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise OSError(err, os.strerror(err))


# Below this a tensor is left to the kernel's own writeback (a syscall per small tensor costs
# more than it saves).
_WRITEBACK_MIN_BYTES = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: queue the range for writeback now,
    without waiting for it (best effort; elsewhere a no-op)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes),
                         _SYNC_FILE_RANGE_WRITE)


def _libc_function(name: str, argtypes: list) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                          ctypes.c_int64])
_sync_file_range = _libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64,
                                                      ctypes.c_int64, ctypes.c_uint])
