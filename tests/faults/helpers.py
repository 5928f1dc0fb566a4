"""Shared checks of the fault tests."""

from __future__ import annotations


def assert_one_line(result, *needles: str) -> str:
    """A failed in-process CLI run (tests.conftest's run_cli) reported in one stderr line
    that holds every needle."""
    assert result.code != 0, result.out + result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
