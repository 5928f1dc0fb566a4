"""O_DIRECT reads (engine/direct_reads.py, Checkpoint.read_direct): the same bytes as the page
cache's reads, at any tensor offset and slice, with a clean fall back where O_DIRECT is
refused, and multi-pass methods that never read a tensor from the disk twice.

The models live in pytest's tmp_path, on the ext4 disk here (tmpfs refuses O_DIRECT: the
tests that need a real direct read skip there, the fall-back tests do not)."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from modelalloy import early_hints, merge
from modelalloy.engine import direct_reads
from modelalloy.engine.budget import ByteBudget
from modelalloy.engine.direct_reads import WINDOW_BYTES, DirectWindows, use_direct_io
from modelalloy.engine.execute import PlanExecutor
from modelalloy.engine.run import as_recipe, make_plan
from modelalloy.errors import CheckpointError, ModelAlloyError
from modelalloy.io.checkpoint import (
    DIRECT_ALIGN,
    Checkpoint,
    aligned_buffer,
    direct_span,
    open_checkpoint,
)
from modelalloy.plan.planner import SLICE_ELEMENTS
from tests.conftest import require_direct_io, write_recipe

BIG = 2 * SLICE_ELEMENTS + 12345  # three slices, the last one short


def _write_unaligned(path: Path, tensors: dict[str, torch.Tensor], pad: int) -> None:
    """A safetensors file whose header is padded with ``pad`` spaces, so the data (and every
    tensor) starts at an offset that is not a multiple of the block size."""
    header, data, pos = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        code = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}[t.dtype]
        header[name] = {"dtype": code, "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        data.append(raw)
        pos += len(raw)
    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(data))


def _direct_works(path: Path) -> None:
    require_direct_io(path)


@pytest.fixture
def odd_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"tiny": torch.arange(7, dtype=torch.uint8),  # shifts the rest by 7 bytes
               "small": torch.randn(5, 3, generator=gen).bfloat16(),  # < one block
               "big": torch.randn(BIG, generator=gen).bfloat16(),
               "wide": torch.randn(3000, generator=gen)}
    path = tmp_path / "odd.safetensors"
    _write_unaligned(path, tensors, pad=4093)
    _direct_works(path)
    return path, tensors


def _direct(ckpt: Checkpoint, name: str, skip: int, nbytes: int) -> bytes:
    buf = aligned_buffer(nbytes + 2 * DIRECT_ALIGN)
    at = ckpt.read_direct(name, skip, nbytes, buf)
    assert at is not None, "O_DIRECT was refused on an ext4 file"
    return buf[at:at + nbytes].numpy().tobytes()


def test_read_direct_returns_the_bytes_at_any_offset(odd_file):
    path, tensors = odd_file
    with open_checkpoint(path) as ckpt:
        for name, t in tensors.items():
            raw = t.view(torch.uint8).reshape(-1).numpy().tobytes()
            spans = [(0, len(raw)), (1, 1), (len(raw) - 3, 3)]
            if len(raw) > 2 * DIRECT_ALIGN:  # across block boundaries, a block exactly
                spans += [(DIRECT_ALIGN - 5, 10), (4097, 3 * DIRECT_ALIGN + 1),
                          (DIRECT_ALIGN, DIRECT_ALIGN)]
            for skip, nbytes in (s for s in spans if s[0] + s[1] <= len(raw)):
                assert _direct(ckpt, name, skip, nbytes) == raw[skip:skip + nbytes], (name, skip)


@pytest.mark.parametrize(("ahead", "piece"), [(False, None), (True, None), (True, DIRECT_ALIGN)])
def test_windows_fill_slices_as_get_slice_does(odd_file, ahead, piece, monkeypatch):
    """In order, across window ends and blocks, going back; read ahead on a pool or not, and
    read ahead in pieces of one block (each window then takes two reads side by side)."""
    if piece:
        monkeypatch.setattr(direct_reads, "PIECE_BYTES", piece)
    path, tensors = odd_file
    with open_checkpoint(path) as ckpt, ThreadPoolExecutor(2) as pool:
        cache: dict[int, torch.Tensor] = {}

        def buffers(index: int, nbytes: int) -> torch.Tensor:
            if index not in cache or cache[index].numel() < nbytes:
                cache[index] = aligned_buffer(nbytes)
            return cache[index]

        # a window of 3001 bytes: slices cross its end and the blocks; reads go back too
        windows = DirectWindows([ckpt, ckpt], "big", 3001, buffers, pool if ahead else None)
        flat = tensors["big"].reshape(-1)
        for start, count in [(0, 1000), (1000, 1000), (999, 2), (1500, 1), (5, 3000),
                             (BIG - 1, 1), (BIG - 700, 700), (0, 1)]:
            for index in (0, 1):
                out = torch.empty(count, dtype=torch.bfloat16)
                assert torch.equal(windows.read(index, start, out), flat[start:start + count])
        windows.close()


def test_truncated_file_is_a_one_line_error(odd_file):
    path, _ = odd_file
    with open_checkpoint(path) as ckpt:
        os.truncate(path, path.stat().st_size - 3 * DIRECT_ALIGN)
        with pytest.raises(CheckpointError, match=r"file ended inside tensor 'wide'"):
            _direct(ckpt, "wide", 0, 3000 * 4)


def test_auto_follows_the_memory_available(monkeypatch):
    class Memory:
        available = 2000

    monkeypatch.setattr(direct_reads.psutil, "virtual_memory", lambda: Memory)
    assert use_direct_io("auto", 1001) and not use_direct_io("auto", 1000)
    assert use_direct_io("on", 0) and not use_direct_io("off", 10**15)
    assert use_direct_io(True, 0) and not use_direct_io(None, 10)
    with pytest.raises(ModelAlloyError, match=r"direct_io='sometimes': use auto, on or off"):
        use_direct_io("sometimes", 0)


# --------------------------------------------------------------------------- whole merges

SHAPES = {"big.weight": (BIG // 5, 5), "small.weight": (33, 5),
          "exact.weight": (SLICE_ELEMENTS * 2,)}
METHODS = {
    "linear": "",
    "task_arithmetic": "",
    "ties": "density: 0.3",
    "dare_ties": "density: 0.5",
    "slerp": "t: 0.3",
    "model_stock": "",
}


def _models(root: Path, count: int = 3) -> list[Path]:
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    folders = []
    for i in range(count):
        folder = root / f"m{i}"
        folder.mkdir(parents=True)
        tensors = {k: (v + 0.01 * i * torch.randn(v.shape, generator=gen)).bfloat16()
                   for k, v in base.items()}
        # odd header padding per model: each model's tensors sit at other block offsets
        _write_unaligned(folder / "model.safetensors", tensors, pad=11 * i + 1)
        folders.append(folder)
    _direct_works(folders[0] / "model.safetensors")
    return folders


def _recipe(tmp_path: Path, method: str, folders: list[Path]) -> Path:
    params = METHODS[method]
    if method == "slerp":
        text = (f"merge_method: slerp\nbase_model: {folders[0]}\nmodels:\n"
                f"  - model: {folders[0]}\n  - model: {folders[1]}\n"
                f"parameters: {{{params}}}\ndtype: bfloat16\n")
    elif method == "model_stock":
        text = (f"merge_method: model_stock\nbase_model: {folders[0]}\nmodels:\n"
                + "".join(f"  - model: {f}\n" for f in folders[1:]) + "dtype: bfloat16\n")
    else:
        weight = "weight: 0.5" + (f", {params}" if params else "")
        base = "" if method == "linear" else f"base_model: {folders[0]}\n"
        experts = folders[1:] if base else folders
        text = (f"merge_method: {method}\n{base}models:\n"
                + "".join(f"  - model: {f}\n    parameters: {{{weight}}}\n" for f in experts)
                + "dtype: bfloat16\n")
    return write_recipe(tmp_path / f"{method}.yaml", text)


class ReadCounter:
    """Bytes read with O_DIRECT, per (file, tensor)."""

    def __init__(self, monkeypatch):
        self.bytes: dict[tuple[str, str], int] = {}
        self.refused = 0
        real = Checkpoint.read_direct

        def counted(ckpt, name, skip, nbytes, into):
            at = real(ckpt, name, skip, nbytes, into)
            if at is None:
                self.refused += 1
            else:
                key = (str(ckpt.path), name)
                self.bytes[key] = self.bytes.get(key, 0) + nbytes
            return at

        monkeypatch.setattr(Checkpoint, "read_direct", counted)


@pytest.mark.parametrize("kernels", ["0", "1"])
@pytest.mark.parametrize("method", list(METHODS))
def test_direct_merge_equals_the_buffered_one_reading_each_byte_once(
        tmp_path, monkeypatch, method, kernels):
    monkeypatch.setenv("MODELALLOY_KERNELS", kernels)
    if kernels == "1":  # windows of one slice: several per tensor, read ahead in pieces
        monkeypatch.setattr("modelalloy.engine.execute.WINDOW_BYTES", 2 * SLICE_ELEMENTS)
        monkeypatch.setattr(direct_reads, "PIECE_BYTES", 3 * DIRECT_ALIGN)
    folders = _models(tmp_path / "models")
    recipe = _recipe(tmp_path, method, folders)
    merge(recipe, tmp_path / "off", direct_io="off", threads=2)
    counter = ReadCounter(monkeypatch)
    merge(recipe, tmp_path / "on", direct_io="on", threads=2)
    want = load_file(str(tmp_path / "off" / "model.safetensors"))
    got = load_file(str(tmp_path / "on" / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # every sliced tensor of every model read directly, each byte exactly once, whatever
    # the method's passes (small.weight merges whole, through the page cache)
    used = [f for f in folders if method != "slerp" or f in folders[:2]]
    nbytes = {"big.weight": 2 * (BIG // 5 * 5), "exact.weight": 4 * SLICE_ELEMENTS}
    assert counter.bytes == {(str(f), n): nbytes[n] for f in used for n in nbytes}


def test_multi_pass_tensor_too_large_to_hold_goes_through_the_page_cache(tmp_path, monkeypatch):
    folders = _models(tmp_path / "models")
    recipe = _recipe(tmp_path, "ties", folders)
    merge(recipe, tmp_path / "off", direct_io="off")
    monkeypatch.setattr("modelalloy.engine.execute.HOLD_BYTES_MAX", 4 * SLICE_ELEMENTS * 3 * 2)
    counter = ReadCounter(monkeypatch)
    merge(recipe, tmp_path / "on", direct_io="on", threads=2)
    want = load_file(str(tmp_path / "off" / "model.safetensors"))
    got = load_file(str(tmp_path / "on" / "model.safetensors"))
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert counter.bytes == {}  # 2 threads x 3 models x 1 MB is over the 1.5 MB allowed


@pytest.mark.parametrize("where", ["open", "read"])
def test_refused_o_direct_falls_back_with_the_same_bits(tmp_path, monkeypatch, where):
    """EINVAL (tmpfs refuses the flag at open; a filesystem with larger blocks refuses the
    read): the page cache serves every read, the same bits."""
    folders = _models(tmp_path / "models")
    recipe = _recipe(tmp_path, "ties", folders)
    merge(recipe, tmp_path / "off", direct_io="off")
    real_open, real_preadv = os.open, os.preadv
    direct_fds: set[int] = set()

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT and where == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_preadv(fd, buffers, offset, *args):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    counter = ReadCounter(monkeypatch)
    merge(recipe, tmp_path / "on", direct_io="on", threads=1)
    want = load_file(str(tmp_path / "off" / "model.safetensors"))
    got = load_file(str(tmp_path / "on" / "model.safetensors"))
    assert all(torch.equal(want[n], got[n]) for n in want)
    # each sliced tensor (2) of each file (3) asks once, then reads through the page cache
    assert counter.bytes == {} and counter.refused == 6


def test_bad_direct_io_option_is_one_line_and_writes_nothing(tmp_path, run_cli):
    folders = _models(tmp_path / "models", count=2)
    recipe = _recipe(tmp_path, "linear", folders)
    result = run_cli("merge", recipe, tmp_path / "out", "--direct-io", "always")
    assert result.code != 0
    assert "--direct-io always: use auto, on or off" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    ok = run_cli("merge", recipe, tmp_path / "out", "--direct-io", "on")
    assert ok.code == 0, ok.err


def test_windows_count_in_the_budget_and_give_way_to_it(tmp_path):
    """Single-pass: 8 MB windows, two per source (read ahead), in the working bytes; under
    a budget they must fit one thread's share, else the page cache serves. Multi-pass: the
    whole tensor, once per source."""
    folders = _models(tmp_path / "models")
    with ExitStack() as stack:
        plan = make_plan(as_recipe(_recipe(tmp_path, "task_arithmetic", folders)), stack)
        entry = next(e for e in plan.entries if e.name == "big.weight")

        def executor(budget: int | None, direct: bool = True) -> PlanExecutor:
            return PlanExecutor(plan, device=torch.device("cpu"), seed=0, threads=2,
                                budget=ByteBudget(budget), allow_nonfinite=False,
                                direct=direct)

        windows = 3 * (entry.numel * 2 + 2 * DIRECT_ALIGN)  # one window holds each tensor
        need = 2 * (entry.working_bytes(3, sliced=True) + windows)
        assert executor(None).direct_window(entry) == WINDOW_BYTES
        assert executor(None).working_bytes(entry) == entry.working_bytes(3, sliced=True) \
            + windows
        assert executor(need).direct_window(entry) == WINDOW_BYTES
        assert executor(need - 1).direct_window(entry) == 0
        assert executor(None, direct=False).direct_window(entry) == 0
        with mock.patch("modelalloy.engine.execute.WINDOW_BYTES", SLICE_ELEMENTS * 2):
            # windows smaller than the tensor: two each, one read ahead
            assert executor(None).direct_bytes(entry) == 2 * 3 * (SLICE_ELEMENTS * 2
                                                                   + 2 * DIRECT_ALIGN)
        assert executor(None).direct_window(next(e for e in plan.entries
                                                 if e.name == "small.weight")) == 0
        ties = make_plan(as_recipe(_recipe(tmp_path, "ties", folders)), stack)
        held = next(e for e in ties.entries if e.name == "big.weight")
        assert PlanExecutor(ties, device=torch.device("cpu"), seed=0, threads=2,
                            budget=ByteBudget(None), allow_nonfinite=False,
                            direct=True).direct_window(held) == 2 * (BIG // 5 * 5)


def test_plan_counts_the_direct_windows_in_its_peak(tmp_path, monkeypatch):
    """`modelalloy plan`'s peak estimate: with direct I/O each thread's largest windows too
    (here big.weight's, one window holding each of the 3 tensors)."""
    from modelalloy.engine import run

    class Process:
        def memory_info(self):
            return mock.Mock(rss=1000)

    monkeypatch.setattr(run.psutil, "Process", Process)
    folders = _models(tmp_path / "models")
    with ExitStack() as stack:
        plan = make_plan(as_recipe(_recipe(tmp_path, "task_arithmetic", folders)), stack)
        entry = next(e for e in plan.entries if e.name == "big.weight")
        windows = 3 * (entry.numel * 2 + 2 * DIRECT_ALIGN)
        plain = run.describe(plan, 2, None)
        direct = run.describe(plan, 2, None, direct=True)
    assert not plain["direct_io"] and direct["direct_io"]
    assert direct["estimated_peak_bytes"] - plain["estimated_peak_bytes"] == 2 * windows


# --------------------------------------------------------------------------- early hints

class DiskCounter:
    """Bytes read from O_DIRECT descriptors (the disk) and from the others (the page cache),
    per file, and the ``DONTNEED`` ranges asked for."""

    def __init__(self, monkeypatch):
        self.direct: dict[str, int] = {}
        self.cached: dict[str, int] = {}
        self.dropped: list[tuple[str, int, int]] = []
        real_open, real_preadv, real_fadvise = os.open, os.preadv, os.posix_fadvise
        paths: dict[int, tuple[str, bool]] = {}

        def open_(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            paths[fd] = (str(path), bool(flags & os.O_DIRECT))
            return fd

        def preadv(fd, buffers, offset, *args):
            got = real_preadv(fd, buffers, offset, *args)
            if fd in paths and not args:  # not an RWF_NOWAIT probe
                path, direct = paths[fd]
                counts = self.direct if direct else self.cached
                counts[path] = counts.get(path, 0) + got
            return got

        def fadvise(fd, offset, length, advice):
            if advice == os.POSIX_FADV_DONTNEED and fd in paths:
                self.dropped.append((paths[fd][0], offset, length))
            return real_fadvise(fd, offset, length, advice)

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "posix_fadvise", fadvise)


@pytest.fixture
def hints(monkeypatch):
    """The early hints' module, its recorded ranges forgotten before and after; pages count
    as cold (hinted whatever this filesystem keeps)."""
    monkeypatch.setattr(early_hints, "_cached", lambda fd, offset: False)
    early_hints.forget()
    yield early_hints
    early_hints.forget()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_hinted_bytes_are_read_through_the_page_cache_once_then_dropped(
        odd_file, hints, monkeypatch):
    """A direct read inside, across either end of, and outside the hinted range: the same
    bytes; the hinted blocks come from the page cache, the rest from O_DIRECT, no byte
    twice; the blocks holding only the wanted bytes are dropped after."""
    path, tensors = odd_file
    data_start = path.stat().st_size - sum(t.numel() * t.element_size()
                                           for t in tensors.values())
    assert data_start % DIRECT_ALIGN  # the tensors start inside a block
    hinted_bytes = 5 * DIRECT_ALIGN + 100  # ends inside a block too
    assert hints.hint_file(path, hinted_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        first, end = hints.hinted_range(fd)
    finally:
        os.close(fd)
    assert (first, end) == (data_start - data_start % DIRECT_ALIGN,
                            (data_start + hinted_bytes) // DIRECT_ALIGN * DIRECT_ALIGN)
    at = data_start + 7 + 5 * 3 * 2  # "big" follows "tiny" and "small"
    raw = tensors["big"].view(torch.uint8).reshape(-1).numpy().tobytes()
    for skip, nbytes in [(0, 10), (5, 3 * DIRECT_ALIGN), (0, 8 * DIRECT_ALIGN),
                         (4 * DIRECT_ALIGN, 2 * DIRECT_ALIGN), (10 * DIRECT_ALIGN, 100)]:
        with monkeypatch.context() as patch:
            counter = DiskCounter(patch)
            with open_checkpoint(path) as ckpt:
                assert _direct(ckpt, "big", skip, nbytes) == raw[skip:skip + nbytes]
        lo, length = direct_span(at + skip, nbytes)
        cached = max(0, min(lo + length, end) - max(lo, first))
        assert counter.cached.get(str(path), 0) == cached, (skip, nbytes)
        assert counter.direct.get(str(path), 0) == length - cached, (skip, nbytes)
        # the whole blocks of the wanted bytes that came through the page cache
        whole = (-(-(at + skip) // DIRECT_ALIGN) * DIRECT_ALIGN,
                 min(end, (at + skip + nbytes) // DIRECT_ALIGN * DIRECT_ALIGN))
        assert counter.dropped == ([(str(path), whole[0], whole[1] - whole[0])]
                                   if cached and whole[0] < whole[1] else []), (skip, nbytes)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_hinted_direct_merge_reads_no_byte_twice(tmp_path, hints, monkeypatch, method):
    """The early hints asked for the first blocks of every model: a direct merge reads them
    from the page cache and the rest with O_DIRECT, the same bits as the buffered merge."""
    folders = _models(tmp_path / "models")
    recipe = _recipe(tmp_path, method, folders)
    merge(recipe, tmp_path / "off", direct_io="off")
    shards = [f / "model.safetensors" for f in folders]
    big, small = 2 * (BIG // 5 * 5), 2 * 33 * 5
    # the first tensor, the second, half of the third (exact.weight)
    assert hints.hint_recipe(recipe, nbytes=big + small + 2 * SLICE_ELEMENTS, total=1 << 30,
                             until=threading.Event()) == len(shards)
    counter = DiskCounter(monkeypatch)
    merge(recipe, tmp_path / "on", direct_io="on", threads=2)
    want = load_file(str(tmp_path / "off" / "model.safetensors"))
    got = load_file(str(tmp_path / "on" / "model.safetensors"))
    assert all(torch.equal(want[n], got[n]) for n in want)
    for shard in shards:
        fd = os.open(shard, os.O_RDONLY)
        first, end = hints.hinted_range(fd)
        os.close(fd)
        size, name = shard.stat().st_size, str(shard)
        # the hinted blocks through the page cache (small.weight too, read whole), the rest
        # with O_DIRECT: no block twice but those where two tensors meet
        assert end - first <= counter.cached[name] <= end - first + small + 2 * DIRECT_ALIGN
        assert size - end <= counter.direct[name] <= size - end + DIRECT_ALIGN
        assert counter.dropped and {p for p, _, _ in counter.dropped} <= set(map(str, shards))
