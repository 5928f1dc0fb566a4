"""benchmarks/merge_speed.py end to end on a tiny model, with mergekit absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "merge_speed.py"
SECTION = "## Merge speed and memory against mergekit"


def _module():
    return load_benchmark("merge_speed")


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
    assert "[warm-up] linear:" in r.stdout and "[warm-up] task" not in r.stdout

    text = out.read_text()
    # the other section is kept, ours is added under its own heading
    assert "## Statistics cost\n\nkept as it is" in text
    assert SECTION in text
    row = next(line for line in text.splitlines() if line.startswith("| linear |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0          # modelalloy median seconds
    assert cells[2] == "skipped"        # mergekit column
    assert "Skipped: mergekit" in text

    results = json.loads(out.with_suffix(".json").read_text())
    linear = results["sizes"]["2M"]["methods"]["linear"]
    runs = linear["modelalloy"]
    assert len(runs) == 1 and runs[0]["rc"] == 0 and runs[0]["peak_rss_mb"] > 0
    # the durable bound writes at the (slower) bandwidth with fsync: read + write / that
    bw = results["sizes"]["2M"]["bandwidth"]
    read_s = linear["io_bound_s"] - linear["write_bytes"] / bw["write_buffered_Bps"]
    assert abs(linear["io_bound_durable_s"] - read_s
               - linear["write_bytes"] / bw["write_fsync_Bps"]) < 1e-9
    bounds = [float(x) for x in cells[8].split(" / ")]
    assert len(bounds) == 2 and bounds[1] >= bounds[0] > 0
    wall = sorted(r["wall_s"] for r in runs)[0]  # the median of one run
    assert [float(x.rstrip("×")) for x in cells[9].split(" / ")] == pytest.approx(
        [wall / linear["io_bound_s"], wall / linear["io_bound_durable_s"]], abs=0.051)

    # the cold-cache rows (default: linear and task arithmetic when they were run)
    cold = results["sizes"]["2M"]["cold"]
    assert set(cold["methods"]) == {"linear"}
    assert set(cold["read_cold_Bps_by_readers"]) == {"1", "2", "4"}
    assert cold["methods"]["linear"]["modelalloy"][0]["rc"] == 0
    assert "**Cold page cache**" in text
    warm_runs = results["sizes"]["2M"]["methods"]

    # --cold-only adds cold rows and keeps the warm ones as they were measured
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2M", "--runs", "1", "--cold-only",
         "--cold-methods", "task_arithmetic", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
         "--mergekit-bin", str(tmp_path / "no-such-mergekit-yaml"), "--no-warm-up"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["sizes"]["2M"]["methods"] == warm_runs
    assert set(again["sizes"]["2M"]["cold"]["methods"]) == {"task_arithmetic"}
    row = next(line for line in out.read_text().splitlines()
               if line.startswith("| task_arithmetic |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and cells[2] == "—" and float(cells[5]) > 0
    with_fsync, without = (float(x) for x in cells[6].split(" / "))
    assert with_fsync > 0 and without > 0 and cells[7].endswith("×") and cells[8] == "—"
    # CPU-s and bytes read from disk per tool; the inputs' size in brackets
    ta = again["sizes"]["2M"]["cold"]["methods"]["task_arithmetic"]
    assert float(cells[11].split(" / ")[0]) > 0 and cells[11].endswith("/ —")
    assert cells[12].endswith(f"({ta['read_bytes'] / 1e9:.2f})")
    assert ta["modelalloy"][0]["disk_read_bytes"] is not None

    # a run of other methods keeps these rows, marked with when they were measured
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2M", "--runs", "1", "--methods", "model_stock",
         "--budgets", "none", "--no-profile", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
         "--mergekit-bin", str(tmp_path / "no-such-mergekit-yaml"), "--no-warm-up"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    third = json.loads(out.with_suffix(".json").read_text())["sizes"]["2M"]
    assert list(third["methods"]) == ["linear", "model_stock"]
    assert third["methods"]["linear"]["modelalloy"] == warm_runs["linear"]["modelalloy"]
    assert set(third["cold"]["methods"]) == {"task_arithmetic"}  # carried, not rerun
    lines = out.read_text().splitlines()
    assert next(ln for ln in lines if ln.startswith("| linear† |"))
    assert next(ln for ln in lines if ln.startswith("| model_stock |")).split("|")[5].strip() \
        == "—"  # no issue-6 target for it
    assert any(ln.startswith("† linear: measured in an earlier run") for ln in lines)

    # --budgets-only replaces the budget rows of the methods it names, nothing else
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "2M", "--budgets-only", "--budget-methods",
         "linear", "--budgets", "1GB", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
         "--mergekit-bin", str(tmp_path / "no-such-mergekit-yaml"), "--no-warm-up"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    fourth = json.loads(out.with_suffix(".json").read_text())["sizes"]["2M"]
    assert fourth["methods"] == third["methods"] and fourth["cold"] == third["cold"]
    [budget] = fourth["budgets"]
    assert (budget["method"], budget["budget"], budget["run"]["rc"]) == ("linear", "1GB", 0)
    assert budget["run"]["peak_anon_mb"] > 0 and budget["measured"]["runs"] == 1
    lines = out.read_text().splitlines()
    assert next(ln for ln in lines if ln.startswith("| linear | 1GB |"))
    assert any(ln.startswith("Measured by `--budgets-only` on ") for ln in lines)

    # the synthetic models are standard sharded HF folders
    base = tmp_path / "cache" / "llama-2M-v1" / "base"
    assert json.loads((base / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]
    assert (base / "model.safetensors.index.json").exists()
    assert len(list(base.glob("*.safetensors"))) > 1


def test_run_measured_reads_the_final_io_counters_of_the_process(tmp_path: Path) -> None:
    """Bytes read and written come from /proc/PID/io after the process has exited (before it
    is reaped), so the reads just before its exit count too: a child that reads a 3 MB file
    as its last act but one has an rchar of at least 3 MB."""
    ms = _module()
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * (3 << 20))
    code = ("import sys; d = open(sys.argv[1], 'rb').read(); "
            "sys.stdout.buffer.write(d[: 2 << 20]); sys.stdout.flush()")
    r = ms.run_measured([sys.executable, "-c", code, str(data)], {}, tmp_path / "log", 60)
    assert r["rc"] == 0
    assert r["rchar"] >= 3 << 20  # the file's bytes, all returned by read()
    assert r["disk_read_bytes"] is not None and r["disk_read_bytes"] >= 0
    assert (tmp_path / "log").stat().st_size == 2 << 20


def test_write_doc_replaces_only_its_section(tmp_path: Path) -> None:
    ms = _module()
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\n{SECTION}\n\nold numbers\n\n## Statistics cost\n\nkept\n")
    ms.write_doc(doc, f"{SECTION}\n\nnew numbers\n")
    ms.write_doc(doc, f"{SECTION}\n\nnewer numbers\n")
    text = doc.read_text()
    assert text.count(SECTION) == 1
    assert "newer numbers" in text and "old numbers" not in text and "new numbers\n" not in text
    assert text.rstrip().endswith("## Statistics cost\n\nkept")


def test_recipes_name_the_same_models_for_both_tools(tmp_path: Path) -> None:
    ms = _module()
    models = {k: tmp_path / k for k in ("base", "expert1", "expert2", "expert3")}
    import yaml

    for method in ms.ALL_METHODS:
        r = yaml.safe_load(ms.recipe_yaml(method, models))
        assert r["merge_method"] == method and r["dtype"] == "bfloat16"
        used = {Path(m["model"]) for m in r["models"]} | (
            {Path(r["base_model"])} if "base_model" in r else set())
        assert used == set(ms.recipe_inputs(method, models))
    ties = yaml.safe_load(ms.recipe_yaml("ties", models))
    assert all(m["parameters"]["density"] == 0.2 for m in ties["models"])


@pytest.mark.slow
def test_a_size_larger_than_ram_runs_cold_only_and_deletes_its_models(tmp_path: Path) -> None:
    """``--larger-than-ram`` (what 3B always is) on the 2M models: cold rows only, with peak
    RSS and the measured floors, and the generated models deleted unless --keep-models."""
    out = tmp_path / "performance.md"
    cache = tmp_path / "cache"
    common = [sys.executable, str(SCRIPT), "--sizes", "2M", "--runs", "1", "--larger-than-ram",
              "--out", str(out), "--cache-dir", str(cache), "--work-dir", str(tmp_path / "work"),
              "--mergekit-bin", str(tmp_path / "no-such-mergekit-yaml"), "--no-warm-up"]
    r = subprocess.run(common + ["--cold-methods", "linear,ties"], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (cache / "llama-2M-v1").exists()  # deleted after the run
    rec = json.loads(out.with_suffix(".json").read_text())["sizes"]["2M"]
    assert rec["larger_than_ram"] and "methods" not in rec and "bandwidth" not in rec
    assert set(rec["cold"]["methods"]) == {"linear", "ties"}
    ties = rec["cold"]["methods"]["ties"]
    assert ties["modelalloy"][0]["rc"] == 0 and ties["modelalloy"][0]["peak_rss_mb"] > 0
    assert ties["floor_durable_s"] > 0 and ties["floor_buffered_s"] > 0
    assert "avx" in rec["env"]["cpu"] or "no AVX2/AVX-512" in rec["env"]["cpu"]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ties |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[9].endswith("anon)") and cells[10] == "—"  # peak RSS: ours, no mergekit
    assert "only cold runs are measured" in text

    # --keep-models keeps them; the default methods are the four
    r = subprocess.run(common + ["--keep-models"], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (cache / "llama-2M-v1" / "COMPLETE.json").exists()
    rec = json.loads(out.with_suffix(".json").read_text())["sizes"]["2M"]
    assert list(rec["cold"]["methods"]) == ["linear", "task_arithmetic", "ties", "dare_ties"]


def test_a_size_that_does_not_fit_on_the_disk_is_refused_before_generating(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import collections
    import shutil

    ms = _module()
    model = ms.SIZES["3B"].params * 2
    need = ms.disk_needed("3B", tmp_path / "cache", tmp_path / "work")
    # one file system: four models, an output and the floor's file, 5% spare
    assert list(need.values()) == [int(6 * model * 1.05)]
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 30 * 10**9))
    with pytest.raises(SystemExit, match=r"--sizes 3B: needs 38\.0 GB free .* 30\.0 GB"):
        ms.check_disk("3B", tmp_path / "cache", tmp_path / "work")
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 40 * 10**9))
    ms.check_disk("3B", tmp_path / "cache", tmp_path / "work")


def _cold_rows(write_Bps: float | None, read_bytes: float, write_bytes: float,
               best_read_Bps: float, date: str) -> dict:
    """Cold rows as ``cold_runs`` records them; ``write_Bps`` None: a record from before the
    write bandwidth was stored with them (only their bound carries it)."""
    run = {"wall_s": 9.0, "rc": 0, "peak_rss_mb": 300.0, "peak_anon_mb": 200.0,
           "user_s": 5.0, "sys_s": 1.0}
    c = {"read_cold_Bps_by_readers": {"1": best_read_Bps / 2, "2": best_read_Bps},
         "date": date, "commit": "abc1234", "runs": 1, "load_before": "0.50/0.50/0.50",
         "load_after": "0.60/0.60/0.60",
         "methods": {"linear": {
             "modelalloy": [run], "read_bytes": read_bytes, "write_bytes": write_bytes,
             # the bound as cold_runs adds it up: read ÷ best cold read + written ÷ write
             "io_bound_s": read_bytes / best_read_Bps + write_bytes / (write_Bps or 4e9),
             "floor_durable_s": 5.0, "floor_buffered_s": 4.0}}}
    if write_Bps is not None:
        c["write_buffered_Bps"] = write_Bps
    return c


def _env(date: str) -> dict:
    return {"date": date, "machine": "2 cores", "load_before": "0.1", "load_after": "0.2",
            "runs": 1, "modelalloy_cmd": "modelalloy merge", "commit": "def5678",
            "mergekit": "not run"}


def _paragraphs(text: str) -> dict[str, str]:
    """The cold paragraph of each size, keyed by the size."""
    out, size = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            size = line.split()[1].rstrip(":")
        elif line.startswith("**Cold page cache**"):
            out[size] = line
    return out


def test_each_cold_paragraph_keeps_the_write_bandwidth_of_its_own_run(tmp_path: Path) -> None:
    """A size rerun warm keeps its earlier cold rows (``carry_over``); their paragraph must
    state the write bandwidth those rows were bounded with, not the rerun's. Rows stored
    without it (before 2026-12-07) get it back from their own bound: 6 GB read at 2 GB/s and
    2 GB written at 4 GB/s is 3.5 s, so 4.00 GB/s."""
    ms = _module()
    results = {"sizes": {
        "100M": {"params": 99e6, "model_bytes": 2e8, "methods": {}, "env": _env("2026-12-07"),
                 # the rerun's own (warm) bandwidths, 1.00 GB/s write: not the cold rows'
                 "bandwidth": {"read_warm_Bps": 8e9, "read_cold_Bps": 2e9,
                               "write_buffered_Bps": 1e9, "write_fsync_Bps": 0.5e9,
                               "probe_bytes": 2e8},
                 "cold": _cold_rows(None, 6e9, 2e9, 2e9, "2026-11-24 16:37 UTC")},
        "1B": {"params": 1.03e9, "model_bytes": 2e9, "methods": {}, "env": _env("2026-12-07"),
               "bandwidth": {"read_warm_Bps": 8e9, "read_cold_Bps": 2e9,
                             "write_buffered_Bps": 1e9, "write_fsync_Bps": 0.5e9,
                             "probe_bytes": 2e9},
               "cold": _cold_rows(3e9, 6e9, 2e9, 2.5e9, "2026-11-25 10:00 UTC")},
        "3B": {"params": 3.2e9, "model_bytes": 6.4e9, "larger_than_ram": True,
               "env": _env("2026-12-07"),
               "write": {"write_buffered_Bps": 7e9, "write_fsync_Bps": 1e9,
                         "probe_bytes": 1 << 30},
               "cold": _cold_rows(2.25e9, 19.2e9, 6.4e9, 2e9, "2026-12-07 15:30 UTC")}}}
    # mergekit killed at --timeout after 1201.3 s (ours took 9.0 s): a lower bound
    results["sizes"]["3B"]["cold"]["methods"]["linear"]["mergekit"] = [
        {"wall_s": 1201.3, "rc": -9, "timed_out": True, "peak_rss_mb": 5000.0,
         "peak_anon_mb": 4000.0, "user_s": 300.0, "sys_s": 90.0}]
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    out = tmp_path / "performance.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--render-only", "--results",
                        str(results_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    cold = _paragraphs(out.read_text())
    assert set(cold) == {"100M", "1B", "3B"}
    assert "measured 2026-11-24 16:37 UTC" in cold["100M"]
    assert "writes at 4.00 GB/s buffered" in cold["100M"]
    assert "writes at 3.00 GB/s buffered" in cold["1B"]
    assert "writes at 2.25 GB/s buffered" in cold["3B"]
    assert not any("1.00 GB/s buffered" in p or "7.00 GB/s" in p for p in cold.values())
    assert ms.cold_write_Bps(results["sizes"]["100M"]["cold"]) == pytest.approx(4e9)
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| linear | 9.00 |")]
    assert len(rows) == 3
    assert "| 9.00 | > 1201 (stopped at the timeout) | > 133.5× |" in rows[2]  # 1201.3 / 9
    assert "| 9.00 | — | — |" in rows[0]  # no mergekit run: nothing to bound


def _in_page_cache(path: Path, offset: int) -> bool:
    """One byte read only if it is in the page cache (``RWF_NOWAIT``)."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.skipif(sys.platform != "linux", reason="posix_fadvise / RWF_NOWAIT: Linux")
def test_drop_cache_drops_a_file_written_moments_ago(tmp_path: Path) -> None:
    """The first cold run after generating the models: their pages are still dirty, which
    ``DONTNEED`` alone leaves in the page cache."""
    import os

    ms = _module()
    clean = tmp_path / "clean.bin"
    with open(clean, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
    ms._drop_cache([clean])
    if _in_page_cache(clean, 0):
        pytest.skip("this file system keeps dropped pages (tmpfs?)")
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(os.urandom(4 << 20))  # dirty: not written back yet
    ms._drop_cache([fresh])
    assert not _in_page_cache(fresh, 0) and not _in_page_cache(fresh, (4 << 20) - 1)
