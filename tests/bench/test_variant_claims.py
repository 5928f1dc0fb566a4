"""The scale / base-quality claims: normalised accuracy, spread and their paired changes."""

import pytest

from modelalloy.bench.variant_claims import (
    change_interval,
    claim_rows,
    method_changes,
    same_test_examples,
    setting_interval,
)
from modelalloy.eval.report import interval_verdict

TASKS = ["a", "b"]


def _hits(per_method: dict[str, list[str]], experts: list[str]) -> dict:
    out = {(m, "default", t): h for m, hs in per_method.items()
           for t, h in zip(TASKS, hs, strict=True)}
    out.update({("expert", "reference", t): h for t, h in zip(TASKS, experts, strict=True)})
    return out


# 8 examples per task; the experts get 8/8 on a, 4/8 on b
EXPERTS = ["11111111", "11110000"]
SMALL = _hits({"ta": ["11110000", "11000000"], "ties": ["11111100", "11100000"]}, EXPERTS)
LARGE = _hits({"ta": ["11111110", "11110000"], "ties": ["11111110", "11100000"]}, EXPERTS)
KEYS = [("ta", "default"), ("ties", "default")]


def test_normalised_accuracy_and_spread_are_the_papers_formulas():
    # norm = mean_t acc(m, t) / acc(expert_t, t); by hand:
    # small: ta (4/8)/1 and (2/8)/(4/8) -> (0.5 + 0.5)/2 = 0.5; ties (6/8 + 3/4)/2 = 0.75
    mean, lo, hi = setting_interval(SMALL, KEYS, TASKS, "mean")
    assert mean == pytest.approx((0.5 + 0.75) / 2)
    assert lo <= mean <= hi
    spread, lo, hi = setting_interval(SMALL, KEYS, TASKS, "spread")
    assert spread == pytest.approx(0.25)
    assert lo <= spread <= hi
    # large: ta (7/8 + 1)/2 = 0.9375, ties (7/8 + 3/4)/2 = 0.8125 -> spread 0.125
    assert setting_interval(LARGE, KEYS, TASKS, "spread")[0] == pytest.approx(0.125)


def test_changes_between_settings_are_paired_over_the_same_examples():
    d, lo, hi = change_interval(SMALL, LARGE, KEYS, TASKS, "mean")
    assert d == pytest.approx((0.9375 + 0.8125) / 2 - 0.625)
    assert lo <= d <= hi
    d, _, _ = change_interval(SMALL, LARGE, KEYS, TASKS, "spread")
    assert d == pytest.approx(0.125 - 0.25)
    # the same hits in both settings: every resample gives the same value in each, so a
    # paired change is exactly 0 with zero width (unpaired resampling would not be)
    assert change_interval(SMALL, SMALL, KEYS, TASKS, "mean") == (0.0, 0.0, 0.0)
    assert change_interval(SMALL, SMALL, KEYS, TASKS, "spread") == (0.0, 0.0, 0.0)
    # two methods with the same hits: their spread is 0 on every resample
    same = _hits({"ta": ["11110000", "11000000"], "ties": ["11110000", "11000000"]}, EXPERTS)
    assert setting_interval(same, KEYS, TASKS, "spread") == (0.0, 0.0, 0.0)
    per = method_changes([("0.5×", SMALL), ("4×", LARGE)], KEYS, TASKS)
    assert per[("ta", "default")][0] == pytest.approx(0.9375 - 0.5)
    assert per[("ties", "default")][0] == pytest.approx(0.8125 - 0.75)


def test_verdicts_from_the_change_interval():
    n = 400  # a large, clear rise in every method: 50% -> 90% of the experts' accuracy
    expert = ["1" * n] * 2
    low = _hits({"ta": ["10" * (n // 2)] * 2, "ties": ["10" * (n // 2)] * 2}, expert)
    high = _hits({"ta": ["1111111110" * (n // 10)] * 2,
                  "ties": ["1111111110" * (n // 10)] * 2}, expert)
    rows = claim_rows("scale", [("0.5×", low), ("1×", low), ("4×", high)], KEYS, TASKS,
                      paired=True)
    rise, converge = rows
    assert rise["verdict"] == "shows" and rise["change"][0] == pytest.approx(0.4)
    assert rise["from"] == "0.5×" and rise["to"] == "4×"
    assert list(rise["per_setting"]) == ["0.5×", "1×", "4×"]
    # both methods are identical everywhere: spread 0 -> 0, no fall of a point is possible
    assert converge["change"] == [0.0, 0.0, 0.0] and converge["verdict"] == "does not show"
    same = claim_rows("scale", [("1×", low), ("4×", low)], KEYS, TASKS, paired=True)
    assert same[0]["verdict"] == "does not show"  # exactly 0 change: no rise of a point
    unpaired = claim_rows("scale", [("0.5×", low), ("4×", high)], KEYS, TASKS, paired=False)
    assert [r["verdict"] for r in unpaired] == ["cannot tell"] * 2
    assert "change" not in unpaired[0]


def test_interval_verdict_rule():
    assert interval_verdict(0.001, 0.05) == "shows"
    assert interval_verdict(-0.05, 0.009) == "does not show"
    assert interval_verdict(-0.05, 0.02) == "cannot tell"
    # a claimed fall (spread down) judged on the negated interval
    assert interval_verdict(0.01, 0.03) == "shows"  # change -0.03..-0.01


def test_same_test_examples_compares_the_split_files(tmp_path):
    def suite(name, text):
        for t in TASKS:
            for split in ("test", "labels"):
                p = tmp_path / name / "data" / t / f"{split}.safetensors"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(f"{t}{split}{text}".encode())
        return tmp_path / name

    a, b, c = suite("a", "x"), suite("b", "x"), suite("c", "y")
    assert same_test_examples([a, b], TASKS)
    assert not same_test_examples([a, b, c], TASKS)
    (b / "data" / "b" / "labels.safetensors").unlink()
    assert not same_test_examples([a, b], TASKS)


def test_base_quality_needs_bases_that_differ():
    """A stronger base is only tested where the base's accuracy rises (paired interval)."""
    n = 400
    expert = ["1" * n] * 2
    merged_low, merged_high = ["10" * (n // 2)] * 2, ["1111111110" * (n // 10)] * 2

    def setting(base, merged):
        hits = _hits({"ta": merged, "ties": merged}, expert)
        hits.update({("base", "reference", t): base for t in TASKS})
        return hits

    weak, strong = "1100" * (n // 4), "1110" * (n // 4)  # 50% -> 75%
    rows = claim_rows("base-quality", [("short", setting(weak, merged_low)),
                                       ("long", setting(strong, merged_high))], KEYS, TASKS,
                      paired=True)
    assert rows[0]["verdict"] == "shows" and "reason" not in rows[0]
    same = claim_rows("base-quality", [("short", setting(weak, merged_low)),
                                       ("long", setting(weak, merged_high))], KEYS, TASKS,
                      paired=True)
    assert same[0]["verdict"] == "cannot tell"
    assert "the base's held-in accuracy does not rise" in same[0]["reason"]
    assert "+0.0" in same[0]["reason"] and same[0]["change"][0] == pytest.approx(0.4)
