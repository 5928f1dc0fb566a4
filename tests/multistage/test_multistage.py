"""merge-multi: equal to the stages run by hand; --lazy skips up-to-date stages and re-runs a
changed stage and its dependents; a cycle is a one-line error."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from modelalloy.engine.run import run_recipe
from modelalloy.recipe import parse_recipe
from tests.conftest import save_gpt2_family

STAGES = """name: soup
merge_method: linear
models:
  - model: expert0
  - model: expert1
    parameters: {weight: 0.5}
---
name: tied
merge_method: ties
base_model: base
models:
  - model: soup
  - model: expert2
parameters: {density: 0.5, weight: 1.0}
dtype: float32
---
merge_method: slerp
base_model: soup
models: [{model: soup}, {model: tied}]
parameters: {t: 0.3}
"""


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _family(tmp_path: Path) -> None:
    save_gpt2_family(tmp_path, n_experts=3)


def test_equals_stages_run_by_hand(tmp_path, run_cli):
    _family(tmp_path)
    (tmp_path / "multi.yaml").write_text(STAGES)
    result = run_cli("merge-multi", tmp_path / "multi.yaml", "-I", tmp_path / "work",
                     "--out-path", tmp_path / "final")
    assert result.code == 0, result.err
    hand = tmp_path / "hand"
    docs = STAGES.split("---\n")
    for doc, out in zip(docs, ["soup", "tied", "final"], strict=True):
        text = doc.replace("name: soup\n", "").replace("name: tied\n", "")
        for stage in ("soup", "tied"):  # earlier stages: the folders made by hand
            text = text.replace(f"model: {stage}", f"model: {hand / stage}")
            text = text.replace(f"base_model: {stage}", f"base_model: {hand / stage}")
        run_recipe(parse_recipe(text, base_dir=tmp_path), hand / out)
    got, want = _weights(tmp_path / "final"), _weights(hand / "final")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(_weights(tmp_path / "work" / "tied")["transformer.h.0.attn.c_attn.weight"],
                       _weights(hand / "tied")["transformer.h.0.attn.c_attn.weight"])


def test_lazy_skips_and_reruns_what_changed(tmp_path, run_cli):
    _family(tmp_path)
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(STAGES)
    args = ("merge-multi", recipe, "-I", tmp_path / "work", "--out-path", tmp_path / "final")
    assert run_cli(*args).code == 0
    again = run_cli(*args)
    assert again.code == 0 and again.out.count("up to date, skipped") == 3, again.out
    recipe.write_text(STAGES.replace("density: 0.5", "density: 0.7"))
    third = run_cli(*args)
    lines = dict(line.split(":", 1) for line in third.out.strip().splitlines())
    assert "skipped" in lines["soup"] and "merged" in lines["tied"] and "merged" in lines["final"]
    fresh = run_cli(*args[:-2], "--out-path", tmp_path / "final", "--no-lazy")
    assert fresh.out.count("merged in") == 3


def test_cycle_and_duplicate_names_are_one_line_errors(tmp_path, run_cli):
    _family(tmp_path)
    cyc = tmp_path / "cycle.yaml"
    cyc.write_text("name: a\nmerge_method: linear\nmodels: [b, expert0]\n---\n"
                   "name: b\nmerge_method: linear\nmodels: [a, expert1]\n")
    result = run_cli("merge-multi", cyc, "-I", tmp_path / "work")
    assert result.code == 1 and "cycle (a -> b -> a)" in result.err
    assert len(result.err.strip().splitlines()) == 1
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\nmerge_method: linear\nmodels: [expert0, expert1]\n---\n"
                   "name: a\nmerge_method: linear\nmodels: [expert0, expert1]\n")
    result = run_cli("merge-multi", dup, "-I", tmp_path / "work")
    assert result.code == 1 and "used twice" in result.err
    final = tmp_path / "final.yaml"
    final.write_text("merge_method: linear\nmodels: [expert0, expert1]\n")
    result = run_cli("merge-multi", final, "-I", tmp_path / "work")
    assert result.code == 1 and "--out-path" in result.err


def test_stage_name_with_an_adapter(tmp_path, run_cli):
    """`soup+adapter`: a stage's output with a LoRA adapter applied (fan_in_fan_out, GPT-2)."""
    from tests.lora.helpers import write_adapter

    _family(tmp_path)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g)
    write_adapter(tmp_path / "ad", {"transformer.h.0.attn.c_attn": (a, b)}, r=2, alpha=4,
                  fan_in_fan_out=True)
    (tmp_path / "multi.yaml").write_text(
        "name: soup\nmerge_method: linear\nmodels: [expert0, expert1]\n---\n"
        "merge_method: linear\nmodels: [soup+ad]\n")
    result = run_cli("merge-multi", tmp_path / "multi.yaml", "-I", tmp_path / "work",
                     "--out-path", tmp_path / "final")
    assert result.code == 0, result.err
    name = "transformer.h.0.attn.c_attn.weight"
    soup = _weights(tmp_path / "work" / "soup")[name]
    torch.testing.assert_close(_weights(tmp_path / "final")[name], soup + 2 * (b @ a).T,
                               rtol=1e-6, atol=1e-6)
