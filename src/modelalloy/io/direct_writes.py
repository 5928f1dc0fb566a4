"""Output written with O_DIRECT, for merges whose inputs do not fit in RAM (docs/direct_io.md).

A buffered ``pwrite`` copies every output byte into the page cache, takes the file's lock for
the copy (merge threads writing to the same shard wait for one another) and leaves dirty pages
for the final ``fsync``. With ``O_DIRECT`` the disk reads our buffer instead. O_DIRECT needs
the file offset, the length and the memory address aligned to ``DIRECT_ALIGN``, while a
safetensors tensor starts at any byte (the header's length decides). So each tensor's file
range is cut in three: the partial block at its start and the one at its end are written
through the page cache (two tensors may share such a block, and the cache merges their bytes),
and the aligned middle is gathered in an aligned buffer, in order, and written directly a
window at a time. Parts that do not continue where the last one ended (the writer accepts
any order) are written through the page cache, the window gathered so far first: the same
bytes on disk either way (Linux keeps the cache coherent with direct writes to a file).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from modelalloy.io.checkpoint import DIRECT_ALIGN, aligned_buffer

# Bytes gathered before one direct write: large writes keep the disk streaming.
WINDOW_BYTES = 8 << 20

WriteBuffered = Callable[[int, memoryview, int], None]  # (fd, data, file offset)


@dataclass
class _Staged:
    """One tensor's direct writes in progress."""

    fd: int  # the shard's O_DIRECT descriptor
    middle: tuple[int, int]  # the aligned file range written directly
    buffer: torch.Tensor  # aligned, WINDOW_BYTES
    start: int  # file offset of buffer[0]
    filled: int = 0  # bytes gathered in buffer
    ordered: bool = True  # False once a part came out of order: the rest goes buffered


class DirectWrites:
    """The direct half of a writer's output: which shards take O_DIRECT writes, and each
    tensor's window. ``write_buffered(fd, data, offset)`` is the writer's own buffered write
    (used for the partial blocks and as the fallback)."""

    def __init__(self, paths: list[os.PathLike[str]], buffered_fds: list[int],
                 write_buffered: WriteBuffered) -> None:
        self._buffered_fds = buffered_fds
        self._write_buffered = write_buffered
        self._fds: list[int | None] = []
        for path in paths:
            try:
                self._fds.append(os.open(path, os.O_WRONLY | os.O_DIRECT))
            except OSError:  # a filesystem without O_DIRECT (tmpfs): that shard is buffered
                self._fds.append(None)
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []  # windows of finished tensors, reused
        self._staged: dict[str, _Staged] = {}

    def begin(self, name: str, shard: int, offset: int, nbytes: int) -> None:
        """Prepare ``name`` (file range ``offset .. offset + nbytes`` of ``shard``)."""
        fd = self._fds[shard]
        first = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
        last = (offset + nbytes) // DIRECT_ALIGN * DIRECT_ALIGN
        if fd is None or last - first < DIRECT_ALIGN:
            return  # smaller than a block inside it: all through the cache
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = aligned_buffer(WINDOW_BYTES)
        with self._lock:
            self._staged[name] = _Staged(fd, (first, last), buffer, first)

    def write(self, name: str, shard: int, offset: int, data: memoryview) -> None:
        """Bytes ``data`` at file ``offset`` of tensor ``name``'s range."""
        staged = self._staged.get(name)
        fd = self._buffered_fds[shard]
        if staged is None:
            self._write_buffered(fd, data, offset)
            return
        first, last = staged.middle
        end = offset + len(data)
        if offset < first:  # the partial block at the start
            head = min(end, first) - offset
            self._write_buffered(fd, data[:head], offset)
            data, offset = data[head:], offset + head
        if end > last:  # the partial block at the end
            tail = max(offset, last)
            self._write_buffered(fd, data[tail - offset:], tail)
            data = data[:tail - offset]
        if not data:
            return
        if not staged.ordered or offset != staged.start + staged.filled:
            self._flush(staged, fd)
            staged.ordered = False
            self._write_buffered(fd, data, offset)
            return
        view = staged.buffer.numpy()
        while data:
            take = min(len(data), WINDOW_BYTES - staged.filled)
            view[staged.filled:staged.filled + take] = np.frombuffer(data[:take], np.uint8)
            staged.filled += take
            data = data[take:]
            if staged.filled == WINDOW_BYTES:
                self._flush(staged, fd)

    def end(self, name: str, shard: int) -> None:
        """Write what ``name``'s window still holds and give the window back."""
        staged = self._release(name)
        if staged is not None:
            try:
                self._flush(staged, self._buffered_fds[shard])
            finally:
                self._give_back(staged)

    def abandon(self, name: str) -> None:
        """Forget ``name``'s window without writing it (the tensor may be written again)."""
        staged = self._release(name)
        if staged is not None:
            self._give_back(staged)

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self._fds)
        self._staged.clear()
        self._free.clear()

    def _release(self, name: str) -> _Staged | None:
        with self._lock:
            return self._staged.pop(name, None)

    def _give_back(self, staged: _Staged) -> None:
        with self._lock:
            self._free.append(staged.buffer)

    def _flush(self, staged: _Staged, buffered_fd: int) -> None:
        """Write the gathered bytes: the whole blocks directly, a partial last block (only
        before a part out of order) through the cache."""
        if not staged.filled:
            return
        whole = staged.filled // DIRECT_ALIGN * DIRECT_ALIGN
        raw = memoryview(staged.buffer.numpy().data)  # the window, as bytes
        if whole and staged.fd >= 0:
            try:
                _pwrite_direct(staged.fd, raw[:whole], staged.start)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                staged.fd = -1  # the filesystem opened it but refuses direct writes
        if staged.fd < 0:
            whole = 0
        if whole < staged.filled:
            self._write_buffered(buffered_fd, raw[whole:staged.filled],
                                 staged.start + whole)
        staged.start += staged.filled
        staged.filled = 0


def _pwrite_direct(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        if n <= 0 or n % DIRECT_ALIGN and n < len(data):
            raise OSError("short direct write")
        data = data[n:]
        offset += n
