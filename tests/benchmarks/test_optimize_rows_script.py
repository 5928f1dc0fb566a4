"""benchmarks/optimize_rows.py: ``--merge`` replaces only the rows a run made."""

from __future__ import annotations

from tests.conftest import load_benchmark


def test_merge_rows_replaces_only_the_rows_run() -> None:
    merge_rows = load_benchmark("optimize_rows").merge_rows
    old = {"suite": "tiny-lm", "budget": 60,
           "rows": [{"row": "task_arithmetic (λ=0.3 tuned on val)", "val": 0.7},
                    {"row": "evolve", "val": 0.8},
                    {"row": "map (task-wise weights)", "val": 0.5}],
           "notes": {"evolve": {"x": 1}, "map (task-wise weights)": {"err": 0.3}}}
    new = {"suite": "tiny-lm", "budget": 60,
           "rows": [{"row": "task_arithmetic (λ=0.3 tuned on val)", "val": 0.71},
                    {"row": "map (task-wise weights)", "val": 0.6},
                    {"row": "fw_merging", "val": 0.65}],
           "notes": {"map (task-wise weights)": {"err": 0.01}}}
    out = merge_rows(old, new)
    assert [r["row"] for r in out["rows"]] == [
        "task_arithmetic (λ=0.3 tuned on val)", "evolve", "map (task-wise weights)",
        "fw_merging"]
    assert [r["val"] for r in out["rows"]] == [0.71, 0.8, 0.6, 0.65]
    assert out["notes"] == {"evolve": {"x": 1}, "map (task-wise weights)": {"err": 0.01}}
    assert old["rows"][2]["val"] == 0.5  # the old dump is not changed in place
    assert merge_rows(None, new) is new
