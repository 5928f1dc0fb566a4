import math

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modelalloy.bundle import PackedMask, TallBundle, compress
from modelalloy.commands import compress as compress_cmds
from modelalloy.errors import MethodError

from .helpers import make_models


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 4)])
def test_packed_mask_roundtrip(shape):
    g = torch.Generator().manual_seed(1)
    m = torch.rand(shape, generator=g) > 0.5
    p = PackedMask.pack(m)
    assert p.bits.dtype == torch.uint8
    assert p.bits.numel() == math.ceil(m.numel() / 8)
    assert torch.equal(p.unpack(), m)


def test_rebuild_is_exact_where_mask_keeps_everything():
    base, experts = make_models(1)
    b = compress(base, {"only": experts[0]})
    rebuilt = b.rebuild("only")
    for n in base:
        assert torch.allclose(rebuilt[n], experts[0][n], atol=1e-6, rtol=0)
        # every non-zero task-vector coordinate is kept
        assert torch.equal(b.mask("only", n), (experts[0][n] - base[n]) != 0)


def test_rebuild_hand_worked_two_tasks():
    base = {"w": torch.zeros(4), "step": torch.tensor(7)}
    experts = {"a": {"w": torch.tensor([1.0, 0.0, 2.0, -1.0]), "step": torch.tensor(9)},
               "b": {"w": torch.tensor([1.0, 3.0, -0.1, 1.0]), "step": torch.tensor(9)}}
    b = compress(base, experts, mask_lambda=0.5)
    # τ_MTL = [2, 3, 1.9, 0]; m_a = [1, 0, 1, 1]; m_b = [1, 1, 0, 1] (see the consensus test)
    assert torch.equal(b.mask("a", "w"), torch.tensor([True, False, True, True]))
    assert torch.equal(b.rebuild("a")["w"], torch.tensor([2.0, 0.0, 1.9, 0.0]))
    assert torch.equal(b.rebuild(1)["w"], torch.tensor([2.0, 3.0, 0.0, 0.0]))
    assert int(b.rebuild("a")["step"]) == 7  # integer buffers come from the base
    with pytest.raises(MethodError):
        b.rebuild("c")


def test_storage_ratio_and_save_load_roundtrip(tmp_path):
    base, experts = make_models(3, shape=(16, 16))
    b = compress(base, {f"t{i}": e for i, e in enumerate(experts)}, mask_lambda=[0.2, 0.4, 0.6])
    rep = b.storage()
    n = sum(t.numel() for t in base.values())
    n_bytes_masks = sum(math.ceil(t.numel() / 8) for t in base.values()) * 3
    assert rep.bundle_bytes == 4 * n + 4 * n + n_bytes_masks
    assert rep.separate_bytes == 4 * n * 4
    assert rep.ratio == pytest.approx((8 * n + n_bytes_masks) / (16 * n))
    b.save(tmp_path / "bundle")
    again = TallBundle.load(tmp_path / "bundle")
    assert again.tasks == ["t0", "t1", "t2"]
    assert again.config.mask_lambda == (0.2, 0.4, 0.6)
    for t in again.tasks:
        r1, r2 = b.rebuild(t), again.rebuild(t)
        assert all(torch.equal(r1[k], r2[k]) for k in r1)


def test_cli_compress_and_rebuild(tmp_path):
    base, experts = make_models(2)
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text('{"model_type": "toy"}')
    for i, e in enumerate(experts):
        (tmp_path / f"e{i}").mkdir()
        save_file(e, str(tmp_path / f"e{i}" / "model.safetensors"))
    app = typer.Typer()
    compress_cmds.register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(tmp_path / "base"), str(tmp_path / "e0"),
                              str(tmp_path / "e1"), "--out", str(tmp_path / "b"),
                              "--names", "math,code"])
    assert res.exit_code == 0, res.output
    assert "ratio" in res.output
    res = runner.invoke(app, ["rebuild", str(tmp_path / "b"), "--task", "code",
                              "--out", str(tmp_path / "code")])
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "code" / "model.safetensors"))
    want = TallBundle.load(tmp_path / "b").rebuild("code")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "code" / "config.json").read_text() == '{"model_type": "toy"}'
    res = runner.invoke(app, ["rebuild", str(tmp_path / "b"), "--task", "nope",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "unknown task" in res.output


def test_compress_from_lazy_checkpoints_equals_in_memory(tmp_path):
    from modelalloy.bundle import lazy_state

    base, experts = make_models(2, seed=3)
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, e in enumerate(experts):
        save_file(e, str(tmp_path / f"e{i}.safetensors"))
    lazy = compress(lazy_state(tmp_path / "base.safetensors"),
                    {f"t{i}": lazy_state(tmp_path / f"e{i}.safetensors") for i in range(2)},
                    base_merge="ties")
    eager = compress(base, {f"t{i}": e for i, e in enumerate(experts)}, base_merge="ties")
    for t in ("t0", "t1"):
        a, b = lazy.rebuild(t), eager.rebuild(t)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_streaming_compress_and_rebuild_equal_the_in_memory_bundle(tmp_path):
    from modelalloy.bundle import compress_to, lazy_state, rebuild_to

    base, experts = make_models(3, seed=8)
    base["steps"] = torch.tensor(5)
    for e in experts:
        e["steps"] = torch.tensor(6)
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, e in enumerate(experts):
        save_file(e, str(tmp_path / f"e{i}.safetensors"))
    report, dens = compress_to(tmp_path / "b", lazy_state(tmp_path / "base.safetensors"),
                               {f"t{i}": lazy_state(tmp_path / f"e{i}.safetensors")
                                for i in range(3)}, base_merge="ties", mask_lambda=0.4,
                               shard_bytes=200)  # small shards: exercises the sharded layout
    mem = compress(base, {f"t{i}": e for i, e in enumerate(experts)}, base_merge="ties",
                   mask_lambda=0.4)
    assert report.bundle_bytes > 0 and dens == pytest.approx(mem.mask_densities())
    loaded = TallBundle.load(tmp_path / "b")
    for t in mem.tasks:
        rebuild_to(tmp_path / "b", t, tmp_path / f"out_{t}")
        from modelalloy.io.checkpoint import read_state_dict

        got = read_state_dict(tmp_path / f"out_{t}")
        want = mem.rebuild(t)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(loaded.rebuild(t)[k], want[k]) for k in want)
    assert int(got["steps"]) == 5


def test_failed_compress_leaves_no_bundle_folder(tmp_path):
    from modelalloy.bundle import compress_to
    from modelalloy.errors import CheckpointError

    base, experts = make_models(2, seed=2)
    experts[1]["head.weight"] = torch.zeros(2, 2)  # wrong shape, found mid-way
    with pytest.raises(CheckpointError, match="head.weight"):
        compress_to(tmp_path / "b", base, {"a": experts[0], "b": experts[1]})
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.fixture(scope="module")
def smoke_suite(tmp_path_factory):
    from modelalloy.bench import load_suite

    return load_suite("tiny-vision", "smoke", cache_dir=tmp_path_factory.mktemp("suites"))


def test_rebuilt_experts_score_like_the_originals_on_the_smoke_suite(smoke_suite, run_cli,
                                                                     tmp_path):
    """TALL's claim on a real suite, through the commands: `compress` the experts, `rebuild`
    each, and the rebuilt expert keeps (nearly) all of its own task's accuracy — far more than
    the multi-task merge the bundle stores (task arithmetic)."""
    from modelalloy.api import merge_state_dicts
    from modelalloy.io.checkpoint import read_state_dict

    suite = smoke_suite
    info = suite.info
    tasks = info.merged_tasks
    res = run_cli("compress", info.base_dir, *[info.expert_dir(t) for t in tasks],
                  "--names", ",".join(tasks), "--mask-lambda", "0.4", "--out", tmp_path / "b")
    assert res.code == 0, res.err
    assert "ratio" in res.out
    base = suite.base_state_dict()
    experts = [suite.expert_state_dict(t) for t in tasks]
    ta = merge_state_dicts("task_arithmetic", base, experts, **{"lambda": 0.3})
    kept = []
    for t, expert in zip(tasks, experts, strict=True):
        res = run_cli("rebuild", tmp_path / "b", "--task", t, "--out", tmp_path / t)
        assert res.code == 0, res.err
        rebuilt = read_state_dict(tmp_path / t)
        assert rebuilt.keys() == expert.keys()
        acc = {name: suite.evaluate(sd, [t])[t]["accuracy"]
               for name, sd in (("rebuilt", rebuilt), ("expert", expert), ("ta", ta))}
        assert acc["rebuilt"] >= 0.9 * acc["expert"], (t, acc)
        assert acc["rebuilt"] > acc["ta"] + 0.05, (t, acc)
        kept.append(acc["rebuilt"] / acc["expert"])
    assert sum(kept) / len(kept) >= 0.95, kept
    # the bundle is smaller than the base and the experts stored apart
    bundle_bytes = sum(f.stat().st_size for f in (tmp_path / "b").rglob("*.safetensors"))
    apart = sum((info.expert_dir(t) / "model.safetensors").stat().st_size for t in tasks)
    apart += (info.base_dir / "model.safetensors").stat().st_size
    assert bundle_bytes < 0.6 * apart
