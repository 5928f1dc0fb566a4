"""Direct I/O for merges whose inputs do not fit in RAM (docs/direct_io.md).

When a merge reads more than the page cache can hold, every page it reads through the cache
evicts another: the kernel copies each byte once more (``preadv`` out of the cache) and
reclaims pages in the merge's own threads, and that system time was most of the CPU of a
streaming merge larger than RAM. With ``O_DIRECT`` the disk writes into our buffers directly.

A thread reads a tensor's inputs through :class:`DirectWindows`: for each source a window of
its bytes, read with ``O_DIRECT`` into an aligned buffer, from which slices are copied into
the engine's slice buffers. A method that passes over a tensor more than once (TIES' counting
passes, dare_ties' L1 pass) gets a window as large as the tensor, so no pass reads the disk
again; a tensor too large to hold that way is read through the page cache, as before, which
still holds it between passes. Sources that cannot be read directly (in memory, pickles,
adapters applied on the fly, a filesystem that refuses O_DIRECT) are read as before: the
same bytes either way. So are the first blocks that the command's early hints brought into
the page cache while torch imported (``Checkpoint.read_direct``: read from the cache, then
dropped), rather than read from the disk a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait

import numpy as np
import psutil
import torch

from modelalloy.errors import ModelAlloyError
from modelalloy.io.checkpoint import DIRECT_ALIGN, HAS_DIRECT_IO, Checkpoint
from modelalloy.plan.sources import TensorSource

DIRECT_IO_MODES = ("auto", "on", "off")
# Bytes of one single-pass window per source: large reads keep the disk streaming (an O_DIRECT
# read has no read-ahead), small enough that 4 sources x 4 threads stay at 128 MB.
WINDOW_BYTES = 8 << 20
# Tensors held whole for a multi-pass method, over all threads: bounded whatever the model
# size (a larger tensor is read through the page cache, which holds it between passes). 1 GB:
# the 4 threads of a direct merge on 2 cores each hold a 3B MLP matrix of 4 models (201 MB).
HOLD_BYTES_MAX = 1 << 30

# A window larger than this is read as pieces of about this size, side by side on the read
# pool: this disk gives 2.9 GB/s to 4 O_DIRECT readers of 64 MB and 4.7 GB/s to 16
# (benchmarks in docs/performance.md), and a held tensor's window was one read per source.
PIECE_BYTES = 16 << 20

AlignedBuffers = Callable[[int, int], torch.Tensor]  # (buffer key, bytes) -> aligned uint8


def use_direct_io(mode: str | bool | None, input_bytes: int) -> bool:
    """Whether a merge reading ``input_bytes`` reads them with O_DIRECT: ``on``, ``off``, or
    ``auto`` (the default): when they exceed half the memory available (``MemAvailable``,
    page cache included). Then a rerun would find most of them evicted anyway (each run's
    later reads evict its earlier ones, and the rest of the system needs memory too), while
    reading them through the cache costs a copy per byte and the reclaim of a page per page
    read (docs/direct_io.md)."""
    if mode is None or mode is True or mode is False:
        mode = {None: "auto", True: "on", False: "off"}[mode]
    if not isinstance(mode, str) or mode.lower() not in DIRECT_IO_MODES:
        raise ModelAlloyError(f"direct_io={mode!r}: use auto, on or off", options=("direct_io",))
    mode = mode.lower()
    if mode == "off" or not HAS_DIRECT_IO:
        return False
    return mode == "on" or input_bytes > psutil.virtual_memory().available // 2


def direct_source(source: TensorSource) -> Checkpoint | None:
    """``source`` when its tensors can be read with O_DIRECT (a safetensors checkpoint)."""
    return source if isinstance(source, Checkpoint) and source.direct_capable else None


Window = tuple[int, int, int, torch.Tensor]  # (first, end) tensor bytes, where first is, buffer


class _WindowRead:
    """A window being read as pieces on the pool: :meth:`result` waits for them all."""

    def __init__(self, first: int, stop: int, buf: torch.Tensor,
                 pieces: list[tuple[int, Future[int | None]]]) -> None:
        self.first, self.stop, self.buf, self.pieces = first, stop, buf, pieces

    def result(self) -> Window | None:
        """The window, or None when the file refused O_DIRECT (a piece's error is raised)."""
        done = [(at, future.result()) for at, future in self.pieces]
        if any(got is None for _, got in done):
            return None
        return self.first, self.stop, done[0][1], self.buf  # type: ignore[return-value]

    def wait(self) -> None:
        wait([future for _, future in self.pieces])


class DirectWindows:
    """One thread's windows onto one tensor's inputs (``name`` in each of ``sources``), read
    with O_DIRECT in windows of ``window_bytes`` (at least one slice; the whole tensor for a
    multi-pass method). ``read`` fills a slice buffer as ``get_slice`` does, the same bytes.

    With a ``pool`` the windows are read ahead: every source's first window at once, then
    each source's next window while the current one is merged, into a second buffer (an
    O_DIRECT read has no kernel read-ahead: without this the disk would wait for the merge
    and the merge for the disk). ``close`` waits for reads still in flight."""

    def __init__(self, sources: Sequence[TensorSource], name: str, window_bytes: int,
                 buffers: AlignedBuffers, pool: Executor | None = None):
        self.name = name
        self.window_bytes = window_bytes
        self._sources = sources
        self._direct = [direct_source(s) for s in sources]
        self._buffers = buffers
        self._pool = pool
        self._windows: list[Window | None] = [None] * len(sources)
        self._ahead: list[_WindowRead | None] = [None] * len(sources)
        self._parity = [1] * len(sources)  # which of a source's two buffers holds its window
        self._started = False

    def read(self, index: int, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. start + out.numel()`` of source ``index``'s flattened tensor,
        into ``out`` (a 1-D buffer of its stored dtype), which is returned."""
        ckpt = self._direct[index]
        if ckpt is None:
            return self._sources[index].get_slice(self.name, start, out)
        size = out.element_size()
        first, end = start * size, (start + out.numel()) * size
        if not self._started:
            self._start(first, end)
        window = self._windows[index]
        if window is None or first < window[0] or end > window[1]:
            window = self._next(index, ckpt, first, end)
            if window is None:  # refused: this source is read through the page cache
                self._direct[index] = None
                return self._sources[index].get_slice(self.name, start, out)
        low, _, at, buf = window
        begin = at + first - low
        # NumPy's copy is a memcpy: 35 GB/s here, against 25 GB/s for torch's uint8 copy_
        # (16% of a cold 3B TIES merge's CPU, which copies every slice once per pass)
        np.copyto(out.view(torch.uint8).numpy(), buf[begin:begin + end - first].numpy())
        return out

    def close(self) -> None:
        """Wait for the reads in flight (their buffers are this thread's, reused next)."""
        for ahead in self._ahead:
            if ahead is not None:
                ahead.wait()
        self._ahead = [None] * len(self._sources)

    def _start(self, first: int, end: int) -> None:
        """Every source's first window, read at once on the pool."""
        self._started = True
        if self._pool is None:
            return
        for index, ckpt in enumerate(self._direct):
            if ckpt is not None:
                self._ahead[index] = self._submit(index, ckpt, first, end, 0)

    def _next(self, index: int, ckpt: Checkpoint, first: int, end: int) -> Window | None:
        """The window of source ``index`` that holds bytes ``first .. end``: the one read
        ahead, or one read now; then the window after it is asked for."""
        future, self._ahead[index] = self._ahead[index], None
        parity = 1 - self._parity[index]  # the buffer the current window is not in
        window = None
        if future is not None:
            window = future.result()
            if window is None:
                return None
            if first < window[0] or end > window[1]:  # a pass went back: not that one
                window = None
        if window is None:
            stop, buf = self._span(index, ckpt, first, end, parity)
            window = self._read(ckpt, first, stop, buf)
            if window is None:
                return None
        self._windows[index], self._parity[index] = window, parity
        if self._pool is not None and window[1] < ckpt.info(self.name).nbytes:
            self._ahead[index] = self._submit(index, ckpt, window[1], window[1], 1 - parity)
        return window

    def _submit(self, index: int, ckpt: Checkpoint, first: int, end: int, parity: int
                ) -> _WindowRead:
        """Read the window from ``first`` that holds ``end`` on the pool, in pieces of about
        ``PIECE_BYTES`` that start on block boundaries of the file, each into its place in
        the window's buffer."""
        assert self._pool is not None
        # the buffer is found here, in the merging thread, whose buffers they are
        stop, buf = self._span(index, ckpt, first, end, parity)
        lead = (ckpt.data_offset(self.name) + first) % DIRECT_ALIGN
        cuts = [first] + [first - lead + k for k in range(PIECE_BYTES, stop - first + lead,
                                                          PIECE_BYTES)] + [stop]
        pieces = []
        for low, high in zip(cuts, cuts[1:], strict=False):
            at = low - first + lead if low > first else 0  # block-aligned place in ``buf``
            pieces.append((at, self._pool.submit(ckpt.read_direct, self.name, low, high - low,
                                                 buf[at:])))
        return _WindowRead(first, stop, buf, pieces)

    def _span(self, index: int, ckpt: Checkpoint, first: int, end: int, parity: int
              ) -> tuple[int, torch.Tensor]:
        """(end of the window from ``first`` that holds ``end``, its buffer)."""
        stop = min(ckpt.info(self.name).nbytes, max(end, first + self.window_bytes))
        # its aligned span is at most two blocks longer than the window
        return stop, self._buffers(2 * index + parity, stop - first + 2 * DIRECT_ALIGN)

    def _read(self, ckpt: Checkpoint, first: int, stop: int, buf: torch.Tensor
              ) -> Window | None:
        at = ckpt.read_direct(self.name, first, stop - first, buf)
        return None if at is None else (first, stop, at, buf)
