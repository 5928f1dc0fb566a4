"""The suite's session end (tests/conftest.py's pytest_unconfigure): one collection, then the
heap is frozen, so the interpreter's exit does not walk it again (that walk made pytest take
a minute to exit after its summary on the whole suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]

INNER_TEST = '''
import gc
import os

KEPT = [[i] for i in range(200_000)]  # tracked objects that live to the exit, as modules do


class Finalized:
    def __del__(self):
        open(os.environ["FINALIZED_MARK"], "w").close()


def test_leaves_a_reference_cycle():
    gc.disable()  # the cycle waits for the session's end
    cycle = Finalized()
    cycle.me = cycle
'''

# Runs in the inner pytest's process at exit, after the conftest's hook and pytest's own.
PROBE = '''
import atexit
import gc


def pytest_configure(config):
    def report():
        print(f"frozen={gc.get_freeze_count()} walked={len(gc.get_objects())}", flush=True)
    atexit.register(report)
'''


@pytest.mark.slow  # a child pytest: ~10 s on a loaded machine
def test_the_session_collects_once_then_freezes_what_lives_to_the_exit(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    (tmp_path / "exit_probe.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    mark = tmp_path / "finalized"
    env = subprocess_env()
    env["PYTHONPATH"] = f"{REPO}:{tmp_path}:{env['PYTHONPATH']}"
    env["FINALIZED_MARK"] = str(mark)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-p", "exit_probe", "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"),
         str(tmp_path / "test_inner.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = [line for line in done.stdout.splitlines() if line.startswith("frozen=")]
    assert len(report) == 1, done.stdout
    frozen, walked = (int(part.split("=")[1]) for part in report[0].split())
    # the garbage cycle a test left was still collected, its finalizer run
    assert mark.exists()
    # the heap that lives to the exit (the 200k lists at least) is frozen: the exit's
    # collections walk only what was made after the freeze
    assert frozen > 200_000, report
    assert walked < frozen // 20, report
