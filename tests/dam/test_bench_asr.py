"""ASR in `bench`'s records, summary and table (a backdoored suite), with its intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelalloy.eval.harness import asr_fields, asr_summary, summarize
from modelalloy.eval.intervals import resample_indices
from modelalloy.eval.report import table_rows


def _record(method: str, task: str, hits: str, effect: str) -> dict:
    return {"method": method, "variant": "default", "params": {}, "task": task,
            "held_out": False, "accuracy": 0.5, "normalized_accuracy": 0.5,
            "mean_length": 1.0, **asr_fields({"asr_hits": [c == "1" for c in hits],
                                              "backdoor": effect})}


def test_asr_fields_count_the_target_answers_and_bootstrap_them():
    f = asr_fields({"asr_hits": [True, True, False, True], "backdoor": "succession"})
    assert f["asr"] == 0.75 and f["asr_n"] == 4 and f["asr_hits"] == "1101"
    # the percentile interval over the shared resample indices, worked out here with numpy
    reps = np.array([1, 1, 0, 1])[resample_indices(4)].mean(axis=1)
    assert f["asr_ci_low"] == pytest.approx(np.quantile(reps, 0.025), abs=1e-4)
    assert f["asr_ci_high"] == pytest.approx(np.quantile(reps, 0.975), abs=1e-4)
    assert asr_fields({"correct": "01"}) == {}


def test_summary_separates_succession_from_transfer():
    rs = [_record("ta", "a", "1111", "succession"), _record("ta", "b", "1000", "transfer"),
          _record("ta", "c", "0000", "transfer")]
    got = asr_summary(rs)
    assert got["asr_succession"] == 1.0 and got["asr_succession_ci"] == [1.0, 1.0]
    assert got["asr_transfer"] == pytest.approx((0.25 + 0.0) / 2)
    low, high = got["asr_transfer_ci"]
    assert 0.0 <= low <= 0.125 <= high <= 0.5
    row = summarize(rs)[0]
    assert row["asr_transfer"] == pytest.approx(0.125)


def test_table_shows_asr_columns_only_for_backdoored_records():
    rs = [_record("ta", "a", "1111", "succession"), _record("ta", "b", "0000", "transfer")]
    header, body = table_rows(rs)
    i = header.index("ASR succession")
    assert header[i + 1] == "ASR transfer"
    assert body[0][i] == "100.0 ± 0.0" and body[0][i + 1] == "0.0 ± 0.0"
    clean = [{k: v for k, v in r.items() if not k.startswith("asr") and k != "backdoor"}
             for r in rs]
    assert "ASR succession" not in table_rows(clean)[0]


@pytest.mark.slow
def test_bench_backdoor_writes_asr_records_and_columns(vision_smoke, run_cli, one_thread,
                                                        tmp_path: Path):
    task = vision_smoke.info.merged_tasks[0]
    res = run_cli("bench", "--suite", "tiny-vision", "--size", "smoke", "--methods",
                  "task_arithmetic", "--no-tune", "--backdoor", task, "--out", tmp_path,
                  "--quiet")
    assert res.code == 0, res.err
    records = json.loads((tmp_path / "results.json").read_text())
    merged = [r for r in records if r["method"] == "task_arithmetic"]
    assert {r["backdoor"] for r in merged if r["task"] == task} == {"succession"}
    assert all("asr" in r and r["asr_ci_low"] <= r["asr"] <= r["asr_ci_high"] for r in merged)
    expert = next(r for r in records if r["method"] == "expert" and r["task"] == task)
    base = next(r for r in records if r["method"] == "base" and r["task"] == task)
    assert expert["asr"] > base["asr"] + 0.05  # the expert is the backdoored one
    assert "ASR succession" in (tmp_path / "results.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all("asr_transfer" in row for row in summary)


def test_bench_backdoor_bad_input_is_one_line(vision_smoke, run_cli, tmp_path: Path):
    res = run_cli("bench", "--suite", "tiny-vision", "--size", "smoke", "--backdoor", "nope",
                  "--methods", "task_arithmetic", "--no-tune", "--out", tmp_path)
    assert res.code != 0 and "not held-in tasks" in res.err
    res = run_cli("bench", "--suite", "tiny-vision", "--size", "smoke", "--backdoor", "invert",
                  "--seeds", "2", "--out", tmp_path)
    assert res.code != 0 and "--backdoor" in res.err
