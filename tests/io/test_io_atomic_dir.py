"""AtomicOutputDir: the atomic swap, its two-step fallback, and recovery of what a killed run
left (a rerun finishes or undoes a half-done swap and removes stale temporaries)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelalloy.errors import OutputError
from modelalloy.io import AtomicOutputDir, LeftoverNotice, atomic_dir, recover_leftovers
from modelalloy.io.writer import ShardedSafetensorsWriter
from tests.conftest import subprocess_env


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _model(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "weights.txt").write_text(text)
    return folder


def test_lock_file_holds_the_pid_and_is_locked_while_writing(tmp_path):
    out = tmp_path / "out"
    with AtomicOutputDir(out) as tmp:
        lock = Path(str(tmp) + ".lock")
        assert lock.read_text().split() == [str(os.getpid())]
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        # a concurrent run's recovery leaves a live owner's folder alone
        assert recover_leftovers(out) == []
        assert tmp.is_dir()
    assert _names(tmp_path) == ["out"]  # lock removed, nothing inside the output
    assert _names(out) == []


def test_force_swaps_in_one_step_where_the_filesystem_can(tmp_path, monkeypatch):
    out = _model(tmp_path / "out", "old")
    calls = []
    real = atomic_dir.rename2
    monkeypatch.setattr(atomic_dir, "rename2", lambda s, d, f: calls.append(f) or real(s, d, f))
    with AtomicOutputDir(out, force=True) as tmp:
        (tmp / "weights.txt").write_text("new")
    assert (out / "weights.txt").read_text() == "new"
    assert _names(tmp_path) == ["out"]
    if atomic_dir._renameat2 is not None:
        assert calls == [atomic_dir.RENAME_EXCHANGE]


def test_force_without_an_atomic_swap_uses_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_dir, "rename2", lambda s, d, f: False)
    out = _model(tmp_path / "out", "old")
    with AtomicOutputDir(out, force=True) as tmp:
        (tmp / "weights.txt").write_text("new")
    assert (out / "weights.txt").read_text() == "new"
    assert _names(tmp_path) == ["out"]


def test_new_output_never_replaces_one_that_appeared(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared"):
        with AtomicOutputDir(out) as tmp:
            (tmp / "weights.txt").write_text("new")
            out.mkdir()  # empty: a plain rename(2) would silently replace it
    assert _names(tmp_path) == ["out"] and _names(out) == []


def _stale(parent: Path, name: str, r: str, *, lock: bool = True, pid: int = 999999) -> Path:
    """What a killed run leaves: `.name.tmp-r` (+ its lock, nobody holding it)."""
    tmp = parent / f".{name}.tmp-{r}"
    tmp.mkdir()
    (tmp / "weights.txt").write_text("new")
    if lock:
        (parent / f".{name}.tmp-{r}.lock").write_text(f"{pid}\n")
    return tmp


def test_rerun_removes_stale_temporaries_and_says_so(tmp_path):
    out = tmp_path / "out"
    _stale(tmp_path, "out", "abc123")
    _stale(tmp_path, "out", "nolock", lock=False)  # an older modelalloy left no lock
    _stale(tmp_path, "other", "zzz")  # another output's: not ours to touch
    with pytest.warns(LeftoverNotice) as notes:
        with AtomicOutputDir(out) as tmp:
            (tmp / "weights.txt").write_text("mine")
    lines = [str(n.message) for n in notes]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert any("process 999999, which is no longer running" in line for line in lines)
    assert _names(tmp_path) == [".other.tmp-zzz", ".other.tmp-zzz.lock", "out"]


def test_half_done_fallback_swap_is_finished(tmp_path):
    # killed between the two renames: old output aside, complete new one not yet in place
    out = tmp_path / "out"
    _model(tmp_path / ".out.old-r1", "old")
    _stale(tmp_path, "out", "r1")
    with pytest.warns(LeftoverNotice) as notes:
        recover_leftovers(out)
    assert "finished replacing" in str(notes[0].message)
    assert (out / "weights.txt").read_text() == "new"
    assert _names(tmp_path) == ["out"]


def test_half_done_swap_without_the_new_output_is_undone(tmp_path):
    out = tmp_path / "out"
    _model(tmp_path / ".out.old-r1", "old")
    (tmp_path / ".out.tmp-r1.lock").write_text("999999\n")
    with pytest.warns(LeftoverNotice, match="restored the previous output"):
        recover_leftovers(out)
    assert (out / "weights.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_legacy_half_done_swap_is_undone(tmp_path):
    # modelalloy before the lock files: old output in .out.old-<random>/x, nothing in place
    out = tmp_path / "out"
    _model(tmp_path / ".out.old-q9" / "x", "old")
    with pytest.warns(LeftoverNotice):
        recover_leftovers(out)
    assert (out / "weights.txt").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_disk_full_inside_the_block_is_one_line_naming_the_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        with AtomicOutputDir(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(e.value).startswith(f"{out}: the disk is full")
    assert "\n" not in str(e.value) and _names(tmp_path) == []


def test_writer_names_the_output_not_the_temporary_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        with AtomicOutputDir(out) as tmp:
            ShardedSafetensorsWriter(tmp, [("a", (10**9, 10**4), torch.float32)], 10**20)
    message = str(e.value)
    assert message.startswith(f"{out}: needs 40.0 TB, only ") and ".tmp-" not in message
    assert " 0.00 GB" not in message


_SCRIPT = """
import sys, time
from modelalloy.io import AtomicOutputDir
from modelalloy.cli import _interrupts_raise, Interrupted
with _interrupts_raise():
    try:
        with AtomicOutputDir(sys.argv[1]) as tmp:
            (tmp / "w").write_text("x")
            print("ready", flush=True)
            time.sleep(30)
    except Interrupted as e:
        print("interrupted", e.signum, flush=True)
        sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_clean_up(tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out)], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and rest.split() == ["interrupted", str(int(sig))]
    assert _names(tmp_path) == []
