"""Statistics files and learned coefficients through the streaming engine (recipe -> folder).

Skipped where the engine and recipe packages are not present (they live on other branches).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("modelalloy.engine.run")
pytest.importorskip("modelalloy.recipe")

from modelalloy import merge, merge_state_dicts  # noqa: E402
from modelalloy.optimize.adamerging import adamerging  # noqa: E402
from modelalloy.stats import load_stats  # noqa: E402
from modelalloy.stats.pipeline import collect_for_model_dir  # noqa: E402


def _load_folder(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_regmean_recipe_streams_saved_grams(tmp_path, tiny_gpt2):
    rows = [{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7]}, {"input_ids": [8, 9, 10]}]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths, sds = [], []
    for s in (1, 2):
        m = tiny_gpt2(s)
        m.save_pretrained(tmp_path / f"e{s}")
        paths.append(tmp_path / f"e{s}")
        sds.append({k: v.clone() for k, v in m.state_dict().items()})
        collect_for_model_dir(tmp_path / f"e{s}", data, "gram", batch_size=2,
                              show_progress=False)
    recipe = {"merge_method": "regmean", "models": [{"model": str(p)} for p in paths],
              "parameters": {"alpha": 0.9, "input_dim": "first"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    merge(tmp_path / "r.yaml", tmp_path / "out")
    got = _load_folder(tmp_path / "out")
    grams = [load_stats(p, "gram") for p in paths]
    expect = merge_state_dicts("regmean", None, sds, stats={"gram": grams}, alpha=0.9,
                               input_dim="first")
    for k, v in got.items():
        torch.testing.assert_close(v.float(), expect[k].float(), rtol=1e-5, atol=1e-6)
    assert "transformer.h.0.attn.c_attn.weight" in got


def test_adamerging_recipe_reproduces_coefficients(tmp_path, tiny_gpt2, lm_batches):
    base = tiny_gpt2(0)
    base.save_pretrained(tmp_path / "base")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    experts, paths = [], []
    for s in (1, 2):
        m = tiny_gpt2(s)
        m.save_pretrained(tmp_path / f"e{s}")
        experts.append({k: v.clone() for k, v in m.state_dict().items()})
        paths.append(str(tmp_path / f"e{s}"))
    tasks = [lm_batches(40 + k, n_batches=1, batch=2) for k in range(2)]
    res = adamerging(base, base_sd, experts, tasks, steps=3, lr=0.05)
    res.save_recipe(tmp_path / "ada.yaml", str(tmp_path / "base"), paths)
    merge(tmp_path / "ada.yaml", tmp_path / "out")
    got = _load_folder(tmp_path / "out")
    for name, v in got.items():
        expect = base_sd[name] + sum(res.weight_of(name, k) * (experts[k][name] - base_sd[name])
                                     for k in range(2))
        torch.testing.assert_close(v.float(), expect, rtol=1e-5, atol=1e-6)
