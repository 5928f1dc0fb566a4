import json

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


def test_cached_suite_is_reused(vision_smoke, monkeypatch):
    from modelalloy.bench import vision

    def rebuild(*args, **kwargs):
        raise AssertionError("a cached suite was built again")

    monkeypatch.setattr(vision, "build", rebuild)
    again = load_suite("tiny-vision", "smoke")
    assert again.info.path == vision_smoke.info.path


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


def test_body_is_a_numbered_block_stack_of_matrices(vision_smoke):
    """Every tensor of the body sits in the ``blocks`` stack that plan/layers.py reads, and
    every weight is a 2-D matrix (so LiNeS scales by depth and DOGE/SVD methods see it all)."""
    from modelalloy.plan.layers import LayerIndexer

    sd = vision_smoke.base_state_dict()
    indexer = LayerIndexer(sd)
    layers = {indexer.lookup(name) for name in sd}
    assert layers == {(i, 4) for i in range(4)}
    assert all(t.dim() == 2 for n, t in sd.items() if n.endswith("weight"))


def test_lines_scales_by_depth_on_the_suite(vision_smoke):
    from modelalloy.api import merge_state_dicts

    base = vision_smoke.base_state_dict()
    experts = [vision_smoke.expert_state_dict(t) for t in vision_smoke.info.merged_tasks]
    avg = merge_state_dicts("linear", None, experts)
    lines = merge_state_dicts("lines", base, experts, beta=0.5)
    # α = 1/T at blocks.0 (= averaging), α + β at the last block (not averaging)
    assert torch.allclose(lines["blocks.0.weight"], avg["blocks.0.weight"], atol=1e-6)
    assert not torch.allclose(lines["blocks.3.weight"], avg["blocks.3.weight"], atol=1e-4)


def test_conv_block_is_the_convolution_it_was_initialised_from():
    from modelalloy.bench.vision import ConvBlock

    torch.manual_seed(3)
    conv = torch.nn.Conv2d(2, 5, 3, padding=1)
    torch.manual_seed(3)
    block = ConvBlock(2, 5, pool=True)
    assert torch.equal(block.weight, conv.weight.reshape(5, 18))
    x = torch.rand(4, 2, 8, 8)
    want = torch.nn.functional.max_pool2d(torch.relu(conv(x)), 2)
    assert torch.allclose(block(x), want, atol=1e-6)
