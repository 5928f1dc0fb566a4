#!/usr/bin/env python
"""How fast this disk serves a merge's reads and writes, without the merge.

Two measurements over the safetensors files of the model folders given (dropped from the page
cache first, so every byte comes from the disk):

- ``reads``: every file read once, with O_DIRECT or through the page cache, by N threads in
  chunks of M bytes: the disk's rate against the requests in flight.
- ``pattern``: a cold multi-pass merge's I/O (each task reads CHUNK bytes of every model with
  O_DIRECT in four pieces side by side, "computes" for a while, writes CHUNK / 4 bytes with
  O_DIRECT, fsync at the end), with each thread reading its task when it starts it (as
  modelalloy does) or reading its next task while it computes the current one.

docs/performance.md ("TIES' kernels, largest tensors first, reads in pieces") has the 3B
figures::

    PYTHONPATH=src python benchmarks/direct_io_rate.py benchmarks/.cache/llama-3B-v1/* \
        [--reads] [--pattern]
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from merge_speed import _drop_cache  # noqa: E402

CHUNK = 50 << 20  # a 3B Llama MLP matrix per model, bf16
BLOCK = 4096


def _files(folders: list[Path]) -> list[list[Path]]:
    return [sorted(folder.glob("*.safetensors")) for folder in folders]


def read_rate(files: list[Path], chunk: int, threads: int, direct: bool) -> float:
    """GB/s reading every file once with ``threads`` threads in ``chunk``-byte reads."""
    _drop_cache(files)
    jobs = iter([(f, off) for f in files for off in range(0, f.stat().st_size, chunk)])
    lock = threading.Lock()

    def worker() -> None:
        buf = mmap.mmap(-1, chunk + BLOCK)  # page-aligned: an O_DIRECT target
        fds: dict[Path, int] = {}
        while True:
            with lock:
                job = next(jobs, None)
            if job is None:
                break
            path, offset = job
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            os.preadv(fds[path], [memoryview(buf)[:chunk]], offset)
        for fd in fds.values():
            os.close(fd)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(f.stat().st_size for f in files) / (time.perf_counter() - started) / 1e9


def pattern_seconds(models: list[list[Path]], out: Path, threads: int, ahead: bool,
                    compute: float) -> tuple[float, float]:
    """(seconds, GB read) of the multi-pass merge's I/O pattern (module docstring)."""
    _drop_cache([f for files in models for f in files])
    tasks = [[(files[k], offset) for files in models]
             for k in range(len(models[0]))
             for offset in range(0, min(f[k].stat().st_size for f in models) - CHUNK, CHUNK)]
    fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for files in models for f in files}
    sink = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    order = iter(range(len(tasks)))
    lock = threading.Lock()
    readers = ThreadPoolExecutor(16)

    def next_task() -> int | None:
        with lock:
            return next(order, None)

    def read(task: int, buffers: list[mmap.mmap]) -> list[Future]:
        piece = CHUNK // 4
        return [readers.submit(os.preadv, fds[path], [memoryview(buf)[p * piece:(p + 1) * piece]],
                               offset + p * piece)
                for (path, offset), buf in zip(tasks[task], buffers, strict=True)
                for p in range(4)]

    def worker() -> None:
        sets = [[mmap.mmap(-1, CHUNK) for _ in models] for _ in range(2)]
        written = mmap.mmap(-1, CHUNK // 4)
        task = next_task()
        current = None if task is None else (task, read(task, sets[0]), 0)
        while current is not None:
            task, reads, parity = current
            wait(reads)
            following = None
            if ahead and (after := next_task()) is not None:
                following = (after, read(after, sets[1 - parity]), 1 - parity)
            time.sleep(compute)  # the merge's CPU (the GIL is free, as in the kernels)
            os.pwrite(sink, written, task * (CHUNK // 4))
            if not ahead and (after := next_task()) is not None:
                following = (after, read(after, sets[parity]), parity)
            current = following

    started = time.perf_counter()
    try:
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        os.fsync(sink)
        seconds = time.perf_counter() - started
    finally:
        readers.shutdown()
        os.close(sink)
        out.unlink(missing_ok=True)
        for fd in fds.values():
            os.close(fd)
    return seconds, len(tasks) * len(models) * CHUNK / 1e9


def _grid(arg: str) -> Iterator[tuple[int, int]]:
    for item in arg.split(","):
        chunk_mb, threads = item.split("x")
        yield int(chunk_mb) << 20, int(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="model folders (safetensors shards)")
    ap.add_argument("--reads", default="8x4,8x8,64x4,64x8,64x16,2x16",
                    help="O_DIRECT read runs as CHUNK_MBxTHREADS, comma-separated")
    ap.add_argument("--buffered", default="1x4,8x4", help="page-cache read runs, the same way")
    ap.add_argument("--pattern", action="store_true", help="also the merge's I/O pattern")
    ap.add_argument("--compute-ms", type=float, default=70.0,
                    help="the pattern's CPU per task (a 3B MLP matrix of TIES: about 70 ms)")
    args = ap.parse_args()
    models = _files(args.folders)
    files = [f for shards in models for f in shards]
    if not files:
        sys.exit("no safetensors files in the folders given")
    for label, grid, direct in (("O_DIRECT", args.reads, True),
                                ("buffered", args.buffered, False)):
        for chunk, threads in _grid(grid) if grid else ():
            rate = read_rate(files, chunk, threads, direct)
            print(f"{label:8s} reads of {chunk >> 20:3d} MB, {threads:2d} threads: "
                  f"{rate:.2f} GB/s", flush=True)
    if args.pattern:
        out = args.folders[0].parent / "direct_io_rate.out"
        for threads, ahead, compute in ((4, False, args.compute_ms), (4, True, args.compute_ms),
                                        (2, True, args.compute_ms), (4, False, 0.0)):
            seconds, gb = pattern_seconds(models, out, threads, ahead, compute / 1e3)
            how = "next task read ahead" if ahead else "read at start"
            print(f"pattern, {threads} threads, {how}, {compute:.0f} ms compute: "
                  f"{seconds:.2f} s ({gb / seconds:.2f} GB/s read)", flush=True)


if __name__ == "__main__":
    main()
