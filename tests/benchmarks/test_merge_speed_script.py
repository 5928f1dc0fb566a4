"""benchmarks/merge_speed.py end to end on a tiny model, with mergekit absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "merge_speed.py"


def test_merge_speed_tiny_without_mergekit(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\n## Statistics cost\n\nkept as it is\n")
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2M", "--runs", "1", "--methods", "linear",
         "--budgets", "none", "--no-profile", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
         "--mergekit-bin", str(tmp_path / "no-such-mergekit-yaml")],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipping the mergekit rows" in r.stdout

    text = out.read_text()
    # the other section is kept, ours is added under its own heading
    assert "## Statistics cost\n\nkept as it is" in text
    assert "## Merge speed and memory against mergekit" in text
    row = next(line for line in text.splitlines() if line.startswith("| linear |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0          # modelalloy median seconds
    assert cells[2] == "skipped"        # mergekit column
    assert "Skipped: mergekit" in text

    results = json.loads(out.with_suffix(".json").read_text())
    runs = results["sizes"]["2M"]["methods"]["linear"]["modelalloy"]
    assert len(runs) == 1 and runs[0]["rc"] == 0 and runs[0]["peak_rss_mb"] > 0

    # the synthetic models are standard sharded HF folders, cached for the next run
    base = tmp_path / "cache" / "llama-2M-v1" / "base"
    assert (base / "config.json").exists()
    assert (base / "model.safetensors.index.json").exists()
    assert len(list(base.glob("*.safetensors"))) > 1

    # rerunning the section replaces it rather than appending a second copy
    r = subprocess.run(r.args, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[gen]" not in r.stdout
    assert out.read_text().count("## Merge speed and memory against mergekit") == 1
