"""`modelalloy bench --study NAME`: each study's table, findings and plot, on smoke suites."""

import json

import pytest
from typer.testing import CliRunner

from modelalloy.bench import studies
from modelalloy.bench.common import SuiteError
from modelalloy.bench.studies import held_out_study, run_study, variant_study, write_study
from modelalloy.eval.harness import EvalError


def test_held_out_study_compares_with_the_base_and_single_experts(vision_smoke, tmp_path):
    study = held_out_study(vision_smoke, ["task_arithmetic"], 0, lambda _m: None)
    rows = {(r["method"], r["variant"]): r for r in study.rows}
    base = rows[("base", "reference")]
    ta = rows[("task_arithmetic", "default")]
    assert ta["vs_base"] == pytest.approx(ta["held_out_accuracy"] - base["held_out_accuracy"],
                                          abs=1e-4)
    lo, hi = ta["vs_base_ci"]
    assert lo <= ta["vs_base"] <= hi
    singles = [r for r in study.rows if r["variant"] == "single"]
    assert {r["method"] for r in singles} == {f"expert:{t}"
                                              for t in vision_smoke.info.merged_tasks}
    assert len(study.findings) == 2  # default and tuned task arithmetic
    paths = write_study(study, tmp_path, "tiny-vision", "smoke")
    assert "Δ held-out vs base" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "correct" not in json.loads(paths["json"].read_text())["rows"][0]


@pytest.mark.slow
def test_variant_study_builds_one_suite_per_setting(vision_smoke, monkeypatch):
    monkeypatch.setitem(studies.VARIANTS, ("base-quality", "tiny-vision", "smoke"),
                        [("short", {"pretrain_steps": 30}), ("default", {}),
                         ("never built", {"width": 64})])
    study = variant_study("base-quality", "tiny-vision", "smoke", ["task_arithmetic"], 0,
                          lambda _m: None, settings=["short", "default"])
    settings = {r["setting"] for r in study.rows}
    assert settings == {"short", "default"}  # only the settings asked for are built
    default_base = next(r for r in study.rows
                        if r["setting"] == "default" and r["method"] == "base")
    n = sum(v.numel() for v in vision_smoke.base_state_dict().values())
    assert default_base["parameters"] == n
    assert len(study.findings) == 2 + 1 + 2  # each setting, the method's change, two claims
    claims = study.rows[0]["claims"]
    assert [c["aggregate"] for c in claims] == ["mean", "spread"]
    # a shorter pre-training leaves the data alone: the settings share their test examples
    assert all("change" in c for c in claims)
    assert "| claim | short | default | default − short | verdict |" in study.table


def test_identical_settings_change_nothing(vision_smoke, monkeypatch, tmp_path):
    """Two labels of one suite: every paired change is exactly 0, so no claimed rise shows."""
    monkeypatch.setitem(studies.VARIANTS, ("scale", "tiny-vision", "smoke"),
                        [("a", {}), ("b", {})])
    study = variant_study("scale", "tiny-vision", "smoke", ["task_arithmetic", "linear"], 0,
                          lambda _m: None)
    claims = study.rows[0]["claims"]
    assert [c["change"] for c in claims] == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert [c["verdict"] for c in claims] == ["does not show", "does not show"]
    spread = claims[1]["per_setting"]["a"][0]
    norms = [r["normalized_accuracy"] for r in study.rows if r["setting"] == "a"
             and (r["method"], r["variant"]) in (("linear", "default"),
                                                 ("task_arithmetic", "tuned"))]
    assert spread == pytest.approx(max(norms) - min(norms), abs=1e-3)  # rows are rounded
    ta = next(r for r in study.rows if r["method"] == "task_arithmetic")
    d, lo, hi = ta["held_out_vs_base"]
    base = next(r for r in study.rows if r["method"] == "base" and r["setting"] == "a")
    assert d == pytest.approx(ta["held_out_accuracy"] - base["held_out_accuracy"], abs=1e-3)
    paths = write_study(study, tmp_path, "tiny-vision", "smoke")
    text = paths["md"].read_text()
    assert "b − a" in text and "parameters" in text and f"{base['parameters']:,}" in text
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_study_settings_are_checked_before_any_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELALLOY_CACHE", str(tmp_path))
    with pytest.raises(EvalError, match=r"two or more of 0\.5×, 1×, 4×.*got 1×, 2×"):
        run_study("scale", "tiny-vision", "smoke", settings=["1×", "2×"])
    with pytest.raises(EvalError, match="two or more"):
        run_study("scale", "tiny-vision", "smoke", settings=["1×"])
    with pytest.raises(EvalError, match="study held-out has no settings"):
        run_study("held-out", "tiny-vision", "smoke", settings=["1×", "4×"])
    assert not any(tmp_path.iterdir())


def test_every_size_of_every_suite_has_scale_and_base_quality_variants():
    for study in ("scale", "base-quality"):
        for suite in ("tiny-vision", "tiny-lm"):
            for size in ("smoke", "full"):
                labels = [label for label, _ in studies.VARIANTS[(study, suite, size)]]
                assert len(labels) == 3


def test_unknown_study_is_one_clear_error():
    with pytest.raises(EvalError, match="unknown study 'nope'"):
        run_study("nope", "tiny-vision", "smoke")


def test_study_cli(vision_smoke, tmp_path):
    from modelalloy.cli import app

    res = CliRunner().invoke(app, ["bench", "--suite", "tiny-vision", "--size", "smoke",
                                   "--study", "experts", "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "held-in acc" in res.output and (tmp_path / "study-experts.png").is_file()


@pytest.mark.slow
def test_cpt_chat_vector_case_and_study(bench_cache):
    import torch

    from modelalloy.bench import load_suite
    from modelalloy.bench.lm_cpt import DOMAIN_LETTERS, CptCase, domain_examples
    from modelalloy.bench.studies import cpt_chat_vector_study

    suite = load_suite("tiny-lm", "smoke")
    case = CptCase.build(suite)
    base, cpt, inst = (case.state_dict(w) for w in ("base", "cpt", "instruct"))
    assert any(not torch.equal(base[k], cpt[k]) for k in base)
    assert any(not torch.equal(base[k], inst[k]) for k in base)
    prompt, _ = domain_examples("rev", 1, 0)[0]
    assert set(prompt.split(":")[1].rstrip("=")) <= set(DOMAIN_LETTERS)
    study = cpt_chat_vector_study(suite, ["task_arithmetic", "widen"], 0, lambda _m: None)
    names = [r["method"] for r in study.rows]
    assert names == ["base", "cpt", "instruct", "chat vector (TA λ=1)", "task_arithmetic",
                     "widen"]
    res = case.evaluate(cpt)
    assert {f"domain:{t}" for t in case.tasks} <= res.keys()
    ref = study.rows[3]
    assert ref["new_vs_chat_vector"] == [0.0, 0.0, 0.0]
    cpt_row = study.rows[1]
    n_new = len(case.tasks)
    acc = sum(res[f"domain:{t}"]["accuracy"] for t in case.tasks) / n_new
    assert cpt_row["new_accuracy"][0] == pytest.approx(acc)


@pytest.mark.slow
def test_long_to_short_pair_shares_one_parent(lm_smoke):
    import torch

    from modelalloy.bench.lm_l2s import L2SCase, both_formats
    from modelalloy.bench.studies import long_to_short_study

    data = both_formats(["sum_long", "sum_short"], 40, 0)
    long_answers = [a for _, a in data if ";" in a]
    assert 5 < len(long_answers) < 35  # both formats, on the pair's shared prompt tag
    assert all(p.startswith("sum:") for p, _ in data)
    case = L2SCase.build(lm_smoke)
    parent, long_sd, short_sd = (case.base_state_dict(), case.expert_state_dict("sum_long"),
                                 case.expert_state_dict("sum_short"))
    suite_base = lm_smoke.base_state_dict()
    assert any(not torch.equal(parent[k], suite_base[k]) for k in parent)
    assert any(not torch.equal(long_sd[k], short_sd[k]) for k in parent)
    # The experts are closer to their parent than to each other's parent-free start.
    tau_l = sum(float((long_sd[k] - parent[k]).norm() ** 2) for k in parent) ** 0.5
    tau_l0 = sum(float((long_sd[k] - suite_base[k]).norm() ** 2) for k in parent) ** 0.5
    assert 0 < tau_l < tau_l0
    with pytest.raises(SuiteError, match="no expert 'rev'"):
        case.expert_state_dict("rev")
    study = long_to_short_study(lm_smoke, ["task_arithmetic"], 0, lambda _m: None)
    names = [r["method"] for r in study.rows]
    assert names[:3] == ["base", "expert:sum_long", "expert:sum_short"]
    assert study.rows[1]["vs_long"] == 0.0
    hits = case.evaluate(long_sd)["sum_long"]
    assert study.rows[1]["accuracy"] == pytest.approx(hits["accuracy"], abs=1e-4)


def test_long_to_short_flag_needs_tiny_lm_before_any_build(tmp_path, monkeypatch):
    from modelalloy.cli import app

    monkeypatch.setenv("MODELALLOY_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["bench", "--suite", "tiny-vision", "--size", "smoke",
                                   "--long-to-short", "--out", str(tmp_path / "out")])
    assert isinstance(res.exception, EvalError)  # the CLI entry prints it as one line
    assert "--long-to-short needs --suite tiny-lm" in str(res.exception)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_long_to_short_flag_merges_the_shared_parent_pair(lm_smoke, tmp_path):
    """The flag's rows are the shared-parent case's (issue 20), not the suite's own pair."""
    from modelalloy.bench.lm_l2s import L2SCase
    from modelalloy.cli import app

    res = CliRunner().invoke(app, ["bench", "--suite", "tiny-lm", "--size", "smoke",
                                   "--methods", "linear", "--no-tune", "--long-to-short",
                                   "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "study-long-to-short.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["base", "expert:sum_long", "expert:sum_short",
                                           "linear"]
    case = L2SCase.build(lm_smoke)
    parent = case.evaluate(case.base_state_dict())["sum_long"]["accuracy"]
    own_base = lm_smoke.evaluate(lm_smoke.base_state_dict(), ["sum_long"])["sum_long"]
    assert rows[0]["accuracy"] == pytest.approx(parent, abs=1e-4)
    assert parent != pytest.approx(own_base["accuracy"], abs=1e-4)  # tells the two pairs apart
    assert (tmp_path / "study-long-to-short.png").is_file()


@pytest.mark.parametrize("suite,size", [("tiny-vision", "full"), ("tiny-vision", "smoke"),
                                        ("tiny-lm", "full"), ("tiny-lm", "smoke")])
def test_scale_variants_have_the_parameters_their_labels_say(suite, size):
    """0.5× / 4×: within a quarter of the label's ratio to the suite's own model."""
    from transformers import GPT2LMHeadModel

    from modelalloy.bench import lm, vision

    def count(overrides):
        if suite == "tiny-vision":
            model = vision._new_body({**vision.SIZES[size], **overrides})
        else:
            model = GPT2LMHeadModel(lm.gpt2_config({**lm.SIZES[size], **overrides}))
        return sum(p.numel() for p in model.parameters())

    variants = studies.VARIANTS[("scale", suite, size)]
    assert [label for label, _ in variants] == ["0.5×", "1×", "4×"]
    one = count({})
    for (label, overrides), ratio in zip(variants, (0.5, 1.0, 4.0), strict=True):
        assert abs(count(overrides) / one - ratio) <= ratio / 4, (label, count(overrides), one)
