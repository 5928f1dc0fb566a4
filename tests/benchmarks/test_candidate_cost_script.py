"""benchmarks/candidate_cost.py end to end on the 2M synthetic Llama: every path of a candidate
timed, with mergekit-evolve's path when a mergekit venv is found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "candidate_cost.py"
SECTION = "## Search candidates: in memory against disk"


@pytest.mark.slow
def test_candidate_cost_2m(tmp_path: Path) -> None:
    mergekit, _ = load_benchmark("merge_speed").find_mergekit(None)
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\n## Other\n\nkept\n")
    cmd = [sys.executable, str(SCRIPT), "--size", "2M", "--candidates", "2", "--no-suites",
           "--methods", "task_arithmetic", "--cache-dir", str(tmp_path / "cache"),
           "--json", str(tmp_path / "cc.json"), "--out", str(out)]
    cmd += ["--mergekit-bin", mergekit] if mergekit else ["--no-mergekit"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.loads((tmp_path / "cc.json").read_text())["candidates"][0]
    assert row["method"] == "task_arithmetic" and row["candidates"] == 2
    for key in ("in_memory", "disk", "disk_from_pretrained"):
        assert row[key] > 0 and row["cpu"][key] > 0, key
    # (a) and (b) share the merge to disk; (b) adds a model built from the folder
    assert row["disk_merge_write"] <= min(row["disk"], row["disk_from_pretrained"])
    if mergekit:  # the worker loaded a model of the candidate's size (checked in the script)
        assert row["mergekit"] >= row["mergekit_merge"] > 0 and row["cpu"]["mergekit"] > 0
    text = out.read_text()
    assert "## Other\n\nkept" in text and SECTION in text
    assert "| synthetic Llama 2M" in text
