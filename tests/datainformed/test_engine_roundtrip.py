"""Statistics files and learned coefficients through the streaming engine (recipe -> folder).

Skipped where the engine and recipe packages are not present (they live on other branches).
"""

from __future__ import annotations

import json

import torch
import yaml

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


def test_fisher_and_aim_recipes_through_the_engine(tmp_path, tiny_gpt2):
    rows = [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7]}]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths, sds = [], []
    for s in (0, 1, 2):
        m = tiny_gpt2(s)
        m.save_pretrained(tmp_path / f"m{s}")
        paths.append(tmp_path / f"m{s}")
        sds.append({k: v.clone() for k, v in m.state_dict().items()})
    for p in paths[1:]:
        collect_for_model_dir(p, data, "fisher", show_progress=False, mode="hard")
    recipe = {"merge_method": "fisher", "models": [{"model": str(p)} for p in paths[1:]]}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(recipe))
    merge(tmp_path / "f.yaml", tmp_path / "fisher-out")
    got = _load_folder(tmp_path / "fisher-out")
    fishers = [load_stats(p, "fisher") for p in paths[1:]]
    # the checkpoint stores the tied lm_head/wte once: merge the same set of tensors
    sds_ckpt = [{k: sd[k] for k in got} for sd in sds[1:]]
    expect = merge_state_dicts("fisher", None, sds_ckpt, stats={"fisher": fishers})
    for k, v in got.items():
        torch.testing.assert_close(v.float(), expect[k].float(), rtol=1e-5, atol=1e-6)
    # AIM reads the base model's activations, from the base's own stats folder
    collect_for_model_dir(paths[0], data, "activations", show_progress=False)
    aim = {"merge_method": "aim", "base_model": str(paths[0]),
           "models": [{"model": str(tmp_path / "fisher-out")}],
           "parameters": {"omega": 0.4, "input_dim": "first"}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(aim))
    merge(tmp_path / "a.yaml", tmp_path / "aim-out")
    got = _load_folder(tmp_path / "aim-out")
    from modelalloy.api import aim_relax

    acts = load_stats(paths[0] / "stats" / "activations.safetensors")
    merged_sd = {k: v.float() for k, v in _load_folder(tmp_path / "fisher-out").items()}
    base_sd = {k: sds[0][k] for k in merged_sd}
    expect = aim_relax(base_sd, merged_sd, acts, omega=0.4, input_dim="first")
    for k, v in got.items():
        torch.testing.assert_close(v.float(), expect[k].float(), rtol=1e-5, atol=1e-6)
    ln = "transformer.h.0.mlp.c_fc.weight"  # relaxed toward the base
    assert not torch.allclose(got[ln].float(), merged_sd[ln])


def test_merge_collects_missing_statistics_from_the_recipes_calibration_data(tmp_path,
                                                                            tiny_gpt2):
    from modelalloy.errors import CheckpointError
    from modelalloy.stats import stats_path

    rows = [{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7]}, {"input_ids": [8, 9, 10]}]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = []
    for s in (1, 2):
        tiny_gpt2(s).save_pretrained(tmp_path / f"e{s}")
        paths.append(tmp_path / f"e{s}")
    recipe = {"merge_method": "regmean", "models": [{"model": str(p)} for p in paths],
              "parameters": {"alpha": 0.9, "input_dim": "first"}}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(recipe))
    try:
        merge(tmp_path / "plain.yaml", tmp_path / "nope")
        raise AssertionError("a merge without statistics or calibration data must fail")
    except CheckpointError as err:
        assert "gram" in str(err) and "modelalloy stats" in str(err)
    assert not (tmp_path / "nope").exists()

    recipe["calibration"] = {"data": "calib.jsonl", "batch_size": 2}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    merge(tmp_path / "r.yaml", tmp_path / "out")
    assert all(stats_path(p, "gram").exists() for p in paths)
    # The same statistics collected by hand give the same merge.
    by_hand = [collect_for_model_dir(p, tmp_path / "calib.jsonl", "gram", batch_size=2,
                                     out=tmp_path / f"hand{i}.safetensors",
                                     show_progress=False)[0] for i, p in enumerate(paths)]
    grams = [load_stats(p, "gram") for p in paths]
    for path, gram in zip(by_hand, grams, strict=True):
        from safetensors.torch import load_file

        hand = load_file(str(path))
        assert hand.keys() == gram.keys()
        for k in hand:
            torch.testing.assert_close(hand[k], gram[k])
