import json
import time

import torch
from safetensors.torch import load_file

from modelalloy.bench import load_suite
from modelalloy.bench.common import cache_root


def test_smoke_suite_layout(vision_smoke, bench_cache):
    info = vision_smoke.info
    assert info.path.parent == cache_root() and str(bench_cache) in str(info.path)
    assert len(info.merged_tasks) >= 3 and len(info.held_out_tasks) >= 1
    cfg = json.loads((info.base_dir / "config.json").read_text())
    assert cfg["model_type"] == "modelalloy-tiny-vision"
    base = vision_smoke.base_state_dict()
    for task in info.merged_tasks + info.held_out_tasks:
        folder = info.expert_dir(task)
        assert (folder / "config.json").is_file()
        expert = load_file(str(folder / "model.safetensors"))
        assert expert.keys() == base.keys()
        assert any(not torch.equal(expert[k], base[k]) for k in base)
        opt = load_file(str(folder / "optimizer.safetensors"))
        for name in base:
            assert opt[f"{name}.exp_avg"].shape == base[name].shape
            assert (opt[f"{name}.exp_avg_sq"] >= 0).all()
        val = load_file(str(info.data_file(task, "val")))
        assert val["inputs"].shape[0] == val["labels"].shape[0] > 0
        test = load_file(str(info.data_file(task, "test")))
        assert set(test) == {"inputs"}  # unlabeled: labels live apart, for the harness only


def test_cached_suite_is_reused(vision_smoke):
    start = time.perf_counter()
    again = load_suite("tiny-vision", "smoke")
    assert again.info.path == vision_smoke.info.path
    assert time.perf_counter() - start < 2.0


def test_config_change_gives_new_suite(vision_smoke, bench_cache):
    from modelalloy.bench import common, vision

    a = common.content_hash({**vision.SIZES["smoke"]}, vision)
    b = common.content_hash({**vision.SIZES["smoke"], "seed": 1}, vision)
    assert a != b and a in vision_smoke.info.path.name


def test_evaluation_is_deterministic(vision_smoke):
    sd = vision_smoke.base_state_dict()
    assert vision_smoke.evaluate(sd) == vision_smoke.evaluate(sd)


def test_expert_beats_base_on_its_task(vision_smoke):
    base = vision_smoke.base_state_dict()
    for task in vision_smoke.info.merged_tasks:
        b = vision_smoke.evaluate(base, [task])[task]["accuracy"]
        e = vision_smoke.evaluate(vision_smoke.expert_state_dict(task), [task])[task]["accuracy"]
        assert e > b + 0.1, (task, b, e)


def test_same_seed_same_suite(vision_smoke, tmp_path):
    again = load_suite("tiny-vision", "smoke", cache_dir=tmp_path)
    assert again.info.path != vision_smoke.info.path
    for task in vision_smoke.info.merged_tasks[:1]:
        a = vision_smoke.expert_state_dict(task)
        b = again.expert_state_dict(task)
        assert all(torch.equal(a[k], b[k]) for k in a)
