"""O_DIRECT output (io/direct_writes.py): the writer's files are byte for byte those of its
buffered writes, whatever the tensors' offsets, the parts' sizes and order, with the aligned
middle of each tensor really written directly, and a clean fall back where O_DIRECT is refused.

The files live in pytest's tmp_path, on the ext4 disk here (tmpfs refuses O_DIRECT: the tests
that need real direct writes skip there, the fall-back tests do not)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open

from modelalloy.errors import OutputError
from modelalloy.io import direct_writes
from modelalloy.io.checkpoint import DIRECT_ALIGN
from modelalloy.io.writer import ShardedSafetensorsWriter
from tests.conftest import require_direct_io

# A window of three blocks: the tensors below fill several, and parts cross their ends.
WINDOW = 3 * DIRECT_ALIGN


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "a_tiny": torch.arange(3, dtype=torch.float32),  # inside one block
        "b_big": torch.randn(9001, generator=gen).bfloat16(),  # 18002 bytes: many blocks
        "c_wide": torch.randn(5000, generator=gen),  # float32: first in its shard
        "d_edge": torch.randn(2 * DIRECT_ALIGN, generator=gen).bfloat16(),
        "e_small": torch.randn(40, generator=gen).bfloat16(),
    }


def _write(folder, tensors, direct: bool, parts: dict[str, list[tuple[int, int]]] | None = None,
           metadata: dict[str, str] | None = None) -> list:
    """Write ``tensors`` (in ``parts``: (start, count) per tensor, else whole)."""
    folder.mkdir()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with ShardedSafetensorsWriter(folder, entries, 24_000, metadata=metadata,
                                  direct=direct) as w:
        for name, t in tensors.items():
            if parts is None or name not in parts:
                w.write(name, t)
                continue
            w.begin(name)
            flat = t.reshape(-1)
            for start, count in parts[name]:
                w.write_part(name, start, flat[start:start + count])
            w.end(name)
        return w.close()


def _parts(n: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(step, n - s)) for s in range(0, n, step)]


def _direct_works(folder) -> None:
    probe = folder / "probe"
    probe.write_bytes(b"\0" * DIRECT_ALIGN)
    try:
        require_direct_io(probe, os.O_WRONLY)
    finally:
        probe.unlink()


@pytest.fixture
def counted(monkeypatch):
    """Bytes written with O_DIRECT (and each call's alignment checked)."""
    monkeypatch.setattr(direct_writes, "WINDOW_BYTES", WINDOW)
    seen = {"bytes": 0, "calls": 0}
    real = direct_writes._pwrite_direct

    def pwrite_direct(fd, data, offset):
        assert offset % DIRECT_ALIGN == 0 and len(data) % DIRECT_ALIGN == 0
        seen["bytes"] += len(data)
        seen["calls"] += 1
        real(fd, data, offset)
    monkeypatch.setattr(direct_writes, "_pwrite_direct", pwrite_direct)
    return seen


ORDERS = {
    "whole": None,
    # odd part sizes: parts cross blocks and windows at every phase
    "in order": {"b_big": _parts(9001, 777), "d_edge": _parts(2 * DIRECT_ALIGN, 2048),
                 "c_wide": _parts(5000, 1)},
    # out of order after a first run in order: the rest goes through the cache
    "out of order": {"b_big": [(0, 3000), (6000, 3001), (3000, 3000)],
                     "c_wide": [(4000, 1000), (0, 4000)]},
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_direct_files_equal_the_buffered_ones(tmp_path, counted, order):
    _direct_works(tmp_path)
    tensors = _tensors()
    # a header of an odd length: every tensor starts off the block grid
    meta = {"note": "x" * 37}
    plain = _write(tmp_path / "plain", tensors, False, ORDERS[order], meta)
    direct = _write(tmp_path / "direct", tensors, True, ORDERS[order], meta)
    assert [p.name for p in plain] == [p.name for p in direct]
    for a, b in zip(plain, direct, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert counted["bytes"] > 0  # the aligned middles went around the cache
    for path in direct:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    assert torch.equal(f.get_tensor(name), tensors[name])


def test_every_whole_block_inside_a_tensor_is_written_directly(tmp_path, counted):
    _direct_works(tmp_path)
    tensors = {"big": torch.randn(20_000).bfloat16()}
    files = _write(tmp_path / "out", tensors, True, {"big": _parts(20_000, 1000)})
    with open(files[0], "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    first = -(-header // DIRECT_ALIGN) * DIRECT_ALIGN
    last = (header + 40_000) // DIRECT_ALIGN * DIRECT_ALIGN
    assert counted["bytes"] == last - first


def test_refused_open_writes_through_the_cache(tmp_path, monkeypatch, counted):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)
    monkeypatch.setattr(direct_writes.os, "open", no_direct)
    tensors = _tensors()
    plain = _write(tmp_path / "plain", tensors, False)
    direct = _write(tmp_path / "direct", tensors, True)
    assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in direct]
    assert counted["calls"] == 0


def test_refused_first_write_falls_back_with_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_writes, "WINDOW_BYTES", WINDOW)
    calls = []

    def refuse(fd, data, offset):
        calls.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(direct_writes, "_pwrite_direct", refuse)
    tensors = _tensors()
    plain = _write(tmp_path / "plain", tensors, False)
    direct = _write(tmp_path / "direct", tensors, True)
    assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in direct]
    assert calls  # tried, refused, then buffered


def test_a_failed_direct_write_is_a_one_line_output_error(tmp_path, monkeypatch):
    _direct_works(tmp_path)
    monkeypatch.setattr(direct_writes, "WINDOW_BYTES", WINDOW)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(direct_writes, "_pwrite_direct", full)
    folder = tmp_path / "out"
    folder.mkdir()
    t = torch.randn(9001).bfloat16()
    w = ShardedSafetensorsWriter(folder, [("big", (9001,), torch.bfloat16)], 10**6,
                                 direct=True)
    with pytest.raises(OutputError, match=r"cannot write tensor 'big' \(No space left"):
        w.write("big", t)
    w.abort()


def test_an_abandoned_tensor_can_be_written_again(tmp_path, counted):
    _direct_works(tmp_path)
    tensors = {"big": torch.randn(9001).bfloat16()}
    folder = tmp_path / "out"
    folder.mkdir()
    w = ShardedSafetensorsWriter(folder, [("big", (9001,), torch.bfloat16)], 10**6,
                                 direct=True)
    w.begin("big")
    w.write_part("big", 0, torch.zeros(5000, dtype=torch.bfloat16))
    w.abandon("big")
    w.write("big", tensors["big"])
    files = w.close()
    with safe_open(str(files[0]), "pt") as f:
        assert torch.equal(f.get_tensor("big"), tensors["big"])
