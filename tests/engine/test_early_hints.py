"""A `modelalloy merge` start hints its recipe's first tensors before torch is imported."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from modelalloy import early_hints
from modelalloy.io.checkpoint import open_checkpoint
from tests.conftest import subprocess_env, write_recipe

SOURCE = Path(early_hints.__file__)


def _safetensors(path: Path, data_bytes: int) -> int:
    """A minimal safetensors file of one uint8 tensor; returns where its data starts."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [data_bytes],
                               "data_offsets": [0, data_bytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + os.urandom(data_bytes))
    return 8 + len(header)


@pytest.mark.parametrize(("argv", "want"), [
    (["-m", "merge", "r.yml", "out"], "r.yml"),
    (["/venv/bin/modelalloy", "--debug", "merge", "r.yml", "out", "--force"], "r.yml"),
    (["-m", "plan", "r.yml"], None),
    (["-m", "merge"], None),
    (["/usr/bin/pytest", "merge", "r.yml"], None),  # another program importing modelalloy
    ([], None)])
def test_only_a_merge_command_line_is_hinted(argv, want):
    got = early_hints.merge_recipe(argv)
    assert (str(got) if got else None) == want


def test_model_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    for name in ("base", "e1", "e 2"):
        (tmp_path / name).mkdir()
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    (other / "cwd-model").mkdir()
    recipe = write_recipe(tmp_path / "r.yml",
                          "merge_method: ties\nbase_model: base  # the base\nmodels:\n"
                          "  - model: e1\n    parameters: {weight: 1}\n  - model: 'e 2'\n"
                          "  - model: cwd-model\n  - model: missing\n  - model: e1\n")
    assert early_hints.model_paths(recipe) == [tmp_path / "base", tmp_path / "e1",
                                               tmp_path / "e 2", Path("cwd-model")]


def test_the_first_shard_is_the_one_the_engine_reads_first(tmp_path):
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    (indexed / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00002-of-00002.safetensors",
                        "b": "model-00001-of-00002.safetensors"}}))
    assert early_hints.first_shard(indexed) == indexed / "model-00001-of-00002.safetensors"
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("b.safetensors", "a.safetensors", ".hidden.safetensors"):
        (plain / name).write_bytes(b"")
    assert early_hints.first_shard(plain) == plain / "a.safetensors"
    assert early_hints.first_shard(plain / "b.safetensors") == plain / "b.safetensors"
    assert early_hints.first_shard(tmp_path / "indexed" / "model.safetensors.index.json") is None


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not hasattr(os, "RWF_NOWAIT"),
                    reason="needs posix_fadvise and RWF_NOWAIT (Linux)")
def test_a_cold_first_shard_is_read_into_the_page_cache(tmp_path):
    shard = tmp_path / "model.safetensors"
    start = _safetensors(shard, 4 << 20)
    _drop(shard)
    fd = os.open(shard, os.O_RDONLY)
    try:
        if early_hints._cached(fd, start):
            pytest.skip("this file system keeps the pages (tmpfs?): nothing to hint")
        assert early_hints.hint_file(shard, 1 << 20)
        deadline = time.monotonic() + 10
        while not early_hints._cached(fd, start + (1 << 20) - 1):
            assert time.monotonic() < deadline, "the hinted pages never arrived"
            time.sleep(0.01)
    finally:
        os.close(fd)
    assert not early_hints.hint_file(shard, 1 << 20)  # cached now: no second hint
    assert not early_hints.hint_file(tmp_path / "missing.safetensors")


def test_hints_need_the_standard_library_only_and_start_before_torch(tmp_path):
    """The module imports nothing heavy; ``import modelalloy`` on a merge command line starts
    the hint thread while torch is still unimported, and the thread hints every model."""
    models = []
    for name in ("base", "e1"):
        (tmp_path / name).mkdir()
        _safetensors(tmp_path / name / "model.safetensors", 1 << 16)
        models.append(tmp_path / name)
    recipe = write_recipe(tmp_path / "r.yml", f"merge_method: task_arithmetic\n"
                          f"base_model: {models[0]}\nmodels:\n  - model: {models[1]}\n")
    standalone = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('eh', {str(SOURCE)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in ('torch', 'numpy', 'yaml') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", standalone], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    order = (
        "import sys, threading\n"
        f"sys.argv = ['-m', 'merge', {str(recipe)!r}, 'out']\n"
        "from modelalloy_probe import record\n"
        "import modelalloy\n"
        "print(record)\n")
    probe = tmp_path / "modelalloy_probe.py"
    probe.write_text(
        "import sys, threading\n"
        "record = []\n"
        "real = threading.Thread.start\n"
        "def start(self):\n"
        "    if self.name == 'modelalloy-early-hints':\n"
        "        record.append('torch' in sys.modules)\n"
        "        run = self._target\n"
        "        self._target = lambda *a: record.append(run(*a))\n"
        "    real(self)\n"
        "    if self.name == 'modelalloy-early-hints':\n"
        "        self.join()\n"
        "threading.Thread.start = start\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    # Whether this file system drops pages is probed on a third file: a probe that misses
    # starts the kernel's readahead, so probing the models themselves would warm them.
    probe_file = tmp_path / "probe.safetensors"
    _safetensors(probe_file, 1 << 16)
    _drop(probe_file)
    fd = os.open(probe_file, os.O_RDONLY)
    drops_pages = not early_hints._cached(fd, 0)
    os.close(fd)
    for model in models:
        _drop(model / "model.safetensors")
    cold = len(models) if drops_pages else 0  # cold files are hinted; kept pages are not
    r = subprocess.run([sys.executable, "-c", order], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    started_after_torch, hinted = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert started_after_torch is False
    assert hinted == cold
    env["MODELALLOY_EARLY_HINTS"] = "0"
    r = subprocess.run([sys.executable, "-c", order], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stderr



@pytest.mark.skipif(not early_hints._can_hint(), reason="needs Linux's sendfile")
def test_each_model_is_read_a_chunk_at_a_time_until_the_merge_reads(tmp_path, monkeypatch):
    """Each model's first tensor data, chunk by chunk, up to the per-model and total caps,
    recorded as whole blocks before each chunk is read; the merge's first read (``stop``)
    ends each model's reads after the chunk in progress."""
    names = ("base", "e1", "e2")
    starts = {}
    for name in names:
        (tmp_path / name).mkdir()
        starts[name] = _safetensors(tmp_path / name / "model.safetensors", 100_000 + 999)
    recipe = write_recipe(tmp_path / "r.yml", "merge_method: task_arithmetic\nbase_model: base\n"
                          "models:\n  - model: e1\n  - model: e2\n")
    calls: list[tuple[str, int, int]] = []
    fds: dict[int, str] = {}
    real_open, real_sendfile = os.open, os.sendfile
    sinks: set[int] = set()

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if str(path) == os.devnull:
            sinks.add(fd)
        else:
            fds[fd] = Path(path).parent.name
        return fd

    def sendfile(out, fd, offset, count):
        assert out in sinks
        calls.append((fds[fd], offset, count))
        return real_sendfile(out, fd, offset, count)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr(early_hints, "_cached", lambda fd, offset: False)
    monkeypatch.setattr(early_hints, "CHUNK_BYTES", 30_000)
    early_hints.forget()
    try:
        # 100,000 bytes per model: chunks of 30,000, 30,000, 30,000, 10,000, in order
        assert early_hints.hint_recipe(recipe, nbytes=100_000, total=10**9,
                                       until=threading.Event()) == 3
        for name in names:
            assert [c[1:] for c in calls if c[0] == name] == [
                (starts[name] + c * 30_000, min(30_000, 100_000 - c * 30_000)) for c in range(4)]
            fd = real_open(tmp_path / name / "model.safetensors", os.O_RDONLY)
            try:
                start = starts[name]
                assert early_hints.hinted_range(fd) == (start - start % 4096,
                                                        (start + 100_000) // 4096 * 4096)
            finally:
                os.close(fd)
        # the total cap shares out
        calls.clear()
        assert early_hints.hint_recipe(recipe, nbytes=100_000, total=3 * 20_000,
                                       until=threading.Event()) == 3
        assert sorted(calls) == [(n, starts[n], 20_000) for n in names]
        # a set event stops each model after its chunk in progress
        calls.clear()
        until = threading.Event()
        monkeypatch.setattr(os, "sendfile", lambda *a: (until.set(), sendfile(*a))[1])
        hinted = early_hints.hint_recipe(recipe, nbytes=100_000, total=10**9, until=until)
        assert 1 <= hinted == len(calls) <= 3
        assert {c for c in calls} <= {(n, starts[n], 30_000) for n in names}
        assert sinks and not any(_is_open(fd) for fd in list(fds) + list(sinks))
    finally:
        early_hints.forget()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_the_merge_reading_stops_the_hints(tmp_path):
    path = tmp_path / "m.safetensors"
    _safetensors(path, 64)
    early_hints._merge_started.clear()
    with open_checkpoint(path) as ckpt:
        ckpt.prefetch("w")
    assert early_hints._merge_started.is_set()
