"""Data-informed recipes through the in-memory path: statistics collected from the recipe's
calibration data as `modelalloy merge` collects them, or given in memory; live modules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import modelalloy
from modelalloy.stats import load_stats, stats_path


@pytest.mark.slow  # collects two models' Grams (about 8 s on the 2-core machine)
def test_regmean_recipe_in_memory_collects_statistics_and_matches_the_disk_merge(tmp_path,
                                                                                tiny_gpt2):
    rows = [{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7]}, {"input_ids": [8, 9, 10]}]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models, paths = [], []
    for s in (1, 2):
        model = tiny_gpt2(s)
        model.save_pretrained(tmp_path / f"e{s}")
        models.append(model)
        paths.append(str(tmp_path / f"e{s}"))
    recipe = {"merge_method": "regmean", "models": [{"model": p} for p in paths],
              "parameters": {"alpha": 0.9, "input_dim": "first"},
              "calibration": {"data": str(tmp_path / "calib.jsonl"), "batch_size": 2}}
    # no sources: the checkpoints are read, the missing Grams collected first
    from_folders = modelalloy.merge(recipe)
    assert all(stats_path(tmp_path / f"e{s}", "gram").exists() for s in (1, 2))
    modelalloy.merge(recipe, tmp_path / "out")
    on_disk = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(from_folders) == set(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(from_folders[name], tensor), name
    # live modules as sources, the statistics given in memory: the same tensors
    grams = {p: load_stats(p, "gram") for p in paths}
    live = modelalloy.merge(recipe, sources=dict(zip(paths, models, strict=True)),
                            stats={"gram": grams})
    for name, tensor in on_disk.items():
        assert torch.equal(live[name], tensor), name
    # (the module's state dict also has the tied lm_head, which the saved folder drops)
    assert torch.equal(live["lm_head.weight"], live["transformer.wte.weight"])
