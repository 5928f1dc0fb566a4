"""Output side: parse_size, check_output_path, AtomicOutputDir, ShardedSafetensorsWriter."""

from __future__ import annotations

import json
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelalloy.errors import OutputError
from modelalloy.io import (
    AtomicOutputDir,
    ShardedSafetensorsWriter,
    check_output_path,
    open_checkpoint,
    parse_size,
)

# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        (1000, 1000),
        ("1000", 1000),
        ("1.5GB", 1_500_000_000),
        (" 10 kib ", 10 * 1024),
        ("3M", 3 * 10**6),
        ("1TB", 10**12),
        ("4_000", 4000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", 0, -5, "5B", "1.2.3GB", None, True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert "\n" not in str(e.value)
    if text == "5B":
        assert "mergekit" in str(e.value)


# --------------------------------------------------------------------------- writer


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.int8]
    for i in range(24):
        dt = dtypes[i % len(dtypes)]
        shape = (i % 5 + 1, 7) if i % 4 else (3 + i,)  # odd sizes: tests alignment
        x = torch.randn(*shape, generator=g) * 10
        out[f"layers.{i}.weight"] = x > 0 if dt == torch.bool else x.to(dt)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    return out


def _entries(sd):
    return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def _write(folder: Path, sd, shard_size, order, threads=1, metadata=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    w = ShardedSafetensorsWriter(folder, _entries(sd), shard_size, metadata)
    if threads == 1:
        for k in order:
            w.write(k, sd[k])
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda k: w.write(k, sd[k]), order))
    return w.close()


def test_threaded_shuffled_writes_are_byte_identical(tmp_path):
    sd = _tensors()
    names = list(sd)
    shuffled = random.Random(1).sample(names, len(names))
    a = _write(tmp_path / "a", sd, 300, names)
    b = _write(tmp_path / "b", sd, 300, shuffled, threads=6)
    assert [p.name for p in a] == [p.name for p in b]
    assert len(a) > 3 and a[-1].name == "model.safetensors.index.json"
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    # every shard is standard safetensors, and together they hold exactly sd
    loaded = {}
    for p in a[:-1]:
        part = load_file(p)
        assert not set(part) & set(loaded)
        loaded.update(part)
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert loaded[k].dtype == sd[k].dtype and torch.equal(loaded[k], sd[k]), k
    index = json.loads(a[-1].read_text())
    assert list(index["weight_map"]) == names  # layout order kept
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    with open_checkpoint(tmp_path / "a") as ck:
        assert sorted(ck.names()) == sorted(names)
        shards = [index["weight_map"][n] for n in ck.names()]
        assert shards == sorted(shards)  # read back in storage order
        for k in sd:
            assert torch.equal(ck.get(k), sd[k])


def test_every_safetensors_dtype_round_trips(tmp_path):
    from modelalloy.io.dtypes import SAFETENSORS_DTYPES

    sd = {}
    for code, dt in SAFETENSORS_DTYPES.items():
        raw = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
        size = torch.empty((), dtype=dt).element_size()
        sd[code] = raw.repeat(1, 1, size).reshape(-1).view(dt).reshape(2, 3, 4)
    sd["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    files = _write(tmp_path, sd, 10**6, list(sd))
    with safe_open(str(files[0]), framework="pt") as lib, open_checkpoint(tmp_path) as ck:
        for k, v in sd.items():
            for got in (lib.get_tensor(k), ck.get(k)):
                assert got.dtype == v.dtype and got.shape == v.shape, k
                assert torch.equal(
                    got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
                )


def test_shard_layout_rules(tmp_path):
    sd = {
        "a": torch.zeros(10),  # 40 B
        "b": torch.zeros(10),  # 40 B -> 80 fits in 100
        "c": torch.zeros(10),  # would pass 100 -> new shard
        "big": torch.zeros(100),  # 400 B > shard_size -> own shard
        "d": torch.zeros(5),
    }
    files = _write(tmp_path, sd, 100, list(sd))
    wm = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert wm == {
        "a": "model-00001-of-00004.safetensors",
        "b": "model-00001-of-00004.safetensors",
        "c": "model-00002-of-00004.safetensors",
        "big": "model-00003-of-00004.safetensors",
        "d": "model-00004-of-00004.safetensors",
    }
    assert len(files) == 5


def test_single_shard_is_model_safetensors_with_metadata(tmp_path):
    sd = _tensors()
    files = _write(tmp_path, sd, 10**9, list(sd), metadata={"merged_by": "modelalloy"})
    assert [p.name for p in files] == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    raw = files[0].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt", "merged_by": "modelalloy"}
    for name, spec in header.items():  # every tensor aligned to its element size
        if name != "__metadata__":
            assert (8 + n + spec["data_offsets"][0]) % sd[name].element_size() == 0, name
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        for k in sd:
            assert torch.equal(f.get_tensor(k), sd[k])


def test_writer_refuses_bad_writes(tmp_path):
    sd = {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    w = ShardedSafetensorsWriter(tmp_path, _entries(sd), 1000)
    with pytest.raises(ValueError, match="not in the output layout"):
        w.write("zzz", sd["a"])
    with pytest.raises(ValueError, match="layout says"):
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="layout says"):
        w.write("b", torch.ones(4))
    w.write("a", sd["a"].t().contiguous().t())  # non-contiguous input is fine
    with pytest.raises(ValueError, match="already written"):
        w.write("a", sd["a"])
    with pytest.raises(ValueError, match="never written.*'b'"):
        w.close()
    w.write("b", sd["b"])
    w.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["a"], sd["a"])
    with pytest.raises(ValueError):
        w.write("a", sd["a"])


def test_writer_refuses_duplicate_entries_and_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        ShardedSafetensorsWriter(tmp_path, [("a", (1,), torch.float32)] * 2, 100)
    with pytest.raises(ValueError, match="str"):
        ShardedSafetensorsWriter(tmp_path, [("a", (1,), torch.float32)], 100, {"k": 1})


def test_writer_context_manager_aborts_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardedSafetensorsWriter(tmp_path, [("a", (2,), torch.float32)], 100):
            raise RuntimeError("boom")


# --------------------------------------------------------------------------- atomic output


def _siblings(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


def test_atomic_output_commits_on_success(tmp_path):
    out = tmp_path / "deep" / "merged"
    with AtomicOutputDir(out) as tmp:
        assert tmp.path.parent == out.parent and tmp.path.name.startswith(".merged.tmp-")
        (tmp.path / "f.txt").write_text("x")
        assert isinstance(tmp, Path) and tmp == tmp.path  # both spellings work
        assert (tmp / "f.txt").read_text() == "x"
        assert not out.exists()
    assert (out / "f.txt").read_text() == "x"
    assert _siblings(out.parent) == ["merged"]
    mode = out.stat().st_mode & 0o777
    assert mode & 0o055  # not mkdtemp's 0700


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_leaves_nothing_on_exception(tmp_path, exc):
    out = tmp_path / "merged"
    with pytest.raises(exc):
        with AtomicOutputDir(out) as tmp:
            ShardedSafetensorsWriter(tmp.path, [("a", (4,), torch.float32)], 100).write(
                "a", torch.ones(4)
            )
            raise exc()
    assert _siblings(tmp_path) == []


def test_atomic_output_existing_needs_force(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError) as e:
        with AtomicOutputDir(out):
            pass
    # the library speaks the API; the command line shows its flag
    assert "force=True" in str(e.value) and str(out) in str(e.value)
    from modelalloy.commands._console import cli_message
    assert "pass --force to replace it" in cli_message(e.value)
    # a failed forced run keeps the old output
    with pytest.raises(RuntimeError):
        with AtomicOutputDir(out, force=True) as tmp:
            (tmp.path / "new.txt").write_text("new")
            raise RuntimeError
    assert _siblings(out) == ["old.txt"] and _siblings(tmp_path) == ["merged"]
    with AtomicOutputDir(out, force=True) as tmp:
        (tmp.path / "new.txt").write_text("new")
    assert _siblings(out) == ["new.txt"] and _siblings(tmp_path) == ["merged"]


def test_atomic_output_refuses_file(tmp_path):
    f = tmp_path / "merged"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        with AtomicOutputDir(f, force=True):
            pass
    assert f.read_text() == "x"


def test_atomic_output_refuses_output_that_appears_meanwhile(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(OutputError, match="appeared"):
        with AtomicOutputDir(out):
            out.mkdir()
    assert _siblings(tmp_path) == ["merged"]


# --------------------------------------------------------------------------- check_output_path


def test_check_output_path_ok_cases(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    check_output_path(tmp_path / "out", [model], force=False)
    check_output_path(tmp_path / "new" / "deeper" / "out", [model], force=False)
    (tmp_path / "out").mkdir()
    check_output_path(tmp_path / "out", [model], force=True)


def test_check_output_path_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    wfile = tmp_path / "w.safetensors"
    wfile.write_bytes(b"")
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "exists").mkdir()
    cases = [
        (afile, True, "is a file"),
        (tmp_path / "exists", False, "already exists"),
        (model, True, "is the input"),
        (model / "sub", True, "inside the input"),
        (tmp_path, True, "contains the input"),
        (wfile, True, "is a file"),
        (afile / "out", False, "is a file"),
    ]
    for out, force, needle in cases:
        with pytest.raises(OutputError) as e:
            check_output_path(out, [model, wfile], force=force)
        msg = str(e.value)
        assert needle in msg and str(out) in msg and "\n" not in msg, (out, msg)
    sub = tmp_path / "work"
    sub.mkdir()
    monkeypatch.chdir(sub)
    with pytest.raises(OutputError, match="current"):
        check_output_path(sub, [model], force=True)
    with pytest.raises(OutputError, match="current"):
        check_output_path(Path("."), [model], force=True)


def test_check_output_path_parent_not_writable():
    # /proc refuses new folders even to root (CI runs as root), so this runs there too.
    with pytest.raises(OutputError, match="cannot write"):
        check_output_path(Path("/proc/modelalloy-out"), [], force=False)


def test_short_reads_and_writes_are_completed(tmp_path, monkeypatch):
    """pwrite/preadv may move fewer bytes than asked (Linux caps one call near 2 GiB)."""
    real_pwrite, real_preadv = os.pwrite, os.preadv

    def short_pwrite(fd, data, offset):
        return real_pwrite(fd, bytes(memoryview(data)[:7]), offset)

    def short_preadv(fd, buffers, offset):
        return real_preadv(fd, [memoryview(buffers[0])[:5]], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    monkeypatch.setattr(os, "preadv", short_preadv)
    sd = _tensors()
    _write(tmp_path, sd, 10**6, list(sd))
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert load_file(tmp_path / "model.safetensors").keys() == sd.keys()
    with open_checkpoint(tmp_path) as ck:
        for k, v in sd.items():
            assert torch.equal(ck.get(k), v), k


def test_empty_layout_writes_a_valid_empty_file(tmp_path):
    files = ShardedSafetensorsWriter(tmp_path, [], 100).close()
    assert [f.name for f in files] == ["model.safetensors"]
    assert load_file(files[0]) == {}


def test_close_refuses_while_a_write_is_in_flight(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [("a", (2,), torch.float32)], 100)
    w._claimed.add("a")  # a write() started in another thread and has not returned
    with pytest.raises(ValueError, match="still being written"):
        w.close()
    w._claimed.discard("a")
    w.write("a", torch.ones(2))
    w.close()

