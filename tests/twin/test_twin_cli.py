"""`modelalloy twin build` from a recipe and `modelalloy eval BUNDLE` on the smoke suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_recipe


@pytest.mark.slow
def test_build_then_eval_bundle_and_broken_bundle(vision_smoke, run_cli, tmp_path: Path):
    info = vision_smoke.info
    tasks = info.merged_tasks
    models = "".join(f"  - model: {info.expert_dir(t)}\n" for t in tasks)
    recipe = write_recipe(tmp_path / "twin.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {info.base_dir}\nmodels:\n{models}"
                          "parameters:\n  lambda: 0.3\n")
    out = tmp_path / "bundle"
    res = run_cli("twin", "build", recipe, "--out", out, "--data", "suite:tiny-vision:smoke",
                  "--density", "0.25", "--router-batch", "32")
    assert res.code == 0, res.err
    assert (out / "twin.json").is_file() and (out / "shared" / "config.json").is_file()
    assert f"{len(tasks)} experts" in res.out
    res = run_cli("eval", out, "--suite", "tiny-vision", "--size", "smoke", "--routing", "top1")
    assert res.code == 0, res.err
    assert "mean accuracy (held-in)" in res.out
    (out / "router.safetensors").unlink()
    res = run_cli("eval", out, "--suite", "tiny-vision", "--size", "smoke")
    assert res.code == 1
    assert "router.safetensors' listed in twin.json is missing" in res.err
    assert len(res.err.strip().splitlines()) == 1
    res = run_cli("twin", "build", recipe, "--out", tmp_path / "b2", "--data",
                  "suite:tiny-vision:smoke", "--density", "0")
    assert res.code == 1 and "density must be in (0, 1]" in res.err
    assert not (tmp_path / "b2").exists()


@pytest.mark.slow
def test_build_from_a_jsonl_file_loads_as_transformers_and_generates(run_cli, tmp_path: Path):
    pytest.importorskip("transformers")
    import json

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelalloy import twin
    from modelalloy.bench.lm import VOCAB, save_tokenizer

    cfg = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    folders = {}
    for name, scale in (("base", 0.0), ("a", 0.05), ("b", 0.05)):
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        save_tokenizer(tmp_path / name)
        folders[name] = tmp_path / name
    data = tmp_path / "router.jsonl"
    data.write_text("\n".join(json.dumps({"task": t, "text": f"{t}:{w}="})
                              for t in ("a", "b") for w in ("xyz", "abc", "qq", "rst")))
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: ties\nbase_model: {folders['base']}"
                          f"\nmodels:\n  - model: {folders['a']}\n    parameters: {{density: 0.5}}"
                          f"\n  - model: {folders['b']}\n    parameters: {{density: 0.5}}\n")
    res = run_cli("twin", "build", recipe, "--out", tmp_path / "bundle", "--data", data,
                  "--router-epochs", "3", "--router-batch", "4")
    assert res.code == 0, res.err
    model = twin.load(tmp_path / "bundle")
    assert isinstance(model.shared, GPT2LMHeadModel)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "c", "text": "x"}))
    res = run_cli("twin", "build", recipe, "--out", tmp_path / "b2", "--data", bad)
    assert res.code == 1 and "task 'c' is not one of the experts (a, b)" in res.err
