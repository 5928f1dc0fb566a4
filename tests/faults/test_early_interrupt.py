"""A Ctrl-C or SIGTERM in the first instant of the command (while torch is imported) is one
line and the usual exit code, like any later interrupt."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import subprocess_env


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (Python does not by default:
    ours is the first thing the console entry does)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_the_start_is_one_line(sig):
    proc = subprocess.Popen([sys.executable, "-m", "modelalloy", "methods"],
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.001)
    with open(f"/proc/{proc.pid}/maps") as f:
        early = "libtorch" not in f.read()
    proc.send_signal(sig)
    assert early, "the handler came after torch was loaded: the start is not covered"
    out, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + sig, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: interrupted ({sig.name})"), err
    assert out == ""
