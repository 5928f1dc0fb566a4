"""peak_rss_bytes: Linux's VmHWM (this process's own peak) in bytes, ru_maxrss where
/proc/self/status cannot be read or says nothing usable (tests/engine/test_allocator.py runs
the real case: a child of a 900 MB parent reports its own peak)."""

from __future__ import annotations

import io
import resource

import pytest

from modelalloy.engine import run


def _status(text: str):
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/self/status"
        return io.StringIO(text)
    return fake_open


def test_vm_hwm_is_read_in_kibibytes(monkeypatch):
    monkeypatch.setattr(run, "open", _status("Name:\tpython\nVmPeak:\t  99999 kB\n"
                                             "VmHWM:\t    2048 kB\nVmRSS:\t  1024 kB\n"),
                        raising=False)
    assert run.peak_rss_bytes() == 2048 * 1024


def _unreadable(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", path)


@pytest.mark.parametrize("opener", [_unreadable, _status("VmHWM:\t lots kB\n"),
                                    _status("VmHWM:\n"), _status("Name:\tpython\n")],
                         ids=["unreadable", "not a number", "no value", "no VmHWM line"])
def test_falls_back_to_ru_maxrss(monkeypatch, opener):
    monkeypatch.setattr(run, "open", opener, raising=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    got = run.peak_rss_bytes()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert before <= got <= after
