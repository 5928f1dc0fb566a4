"""Twin-Merging bundles on disk: round trip, sizes, atomic write, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelalloy import twin
from modelalloy.errors import MethodError, OutputError
from modelalloy.twin import TwinBundleError, TwinRouter, build_bundle
from tests.twin.helpers import Tiny, family, task_batches


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, experts = family()
    bundle = build_bundle(base, experts, Tiny(), task_batches(2), density=0.5,
                          router_epochs=60, router_batch=16, router_lr=5e-3)
    out = tmp_path_factory.mktemp("twin") / "bundle"
    bundle.save(out, experts_bytes=2 * sum(t.numel() * 4 for t in base.values()))
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_round_trip_routes_and_reports_sizes(bundle_dir: Path):
    meta = json.loads((bundle_dir / "twin.json").read_text())
    files = [p for p in bundle_dir.rglob("*") if p.is_file()]
    on_disk = sum(p.stat().st_size for p in files if p.name != "twin.json")
    assert meta["sizes"]["bundle_bytes"] == on_disk
    assert meta["sizes"]["ratio"] == pytest.approx(on_disk / meta["sizes"]["experts_bytes"],
                                                   abs=1e-4)
    assert meta["factors"]["t0"]["fc.weight"] == 3  # floor(0.5 * min(8, 6))
    assert meta["factors"]["t0"]["fc.bias"] == "dense"
    model = twin.load(bundle_dir, Tiny())
    ids = task_batches(2, per_task=4, seed=1)
    gates = model.route(torch.cat([ids["t0"][0], ids["t1"][0]]))
    assert torch.allclose(gates.sum(-1), torch.ones(8))
    # the router learnt to tell the two tasks' inputs apart
    assert (gates.argmax(-1) == torch.tensor([0] * 4 + [1] * 4)).float().mean() >= 0.75
    out = model(ids["t0"][0])
    assert out.shape == (4, 5, 5)
    assert not any(p.name.startswith(".") for p in bundle_dir.parent.iterdir())


def test_existing_output_is_refused(bundle_dir: Path):
    base, experts = family()
    b = twin.TwinBundle.load(bundle_dir)
    with pytest.raises(OutputError, match="already exists"):
        b.save(bundle_dir)
    del base, experts


def test_missing_factor_is_a_one_line_error(bundle_dir: Path, tmp_path: Path):
    broken = _copy(bundle_dir, tmp_path / "b")
    factors = load_file(str(broken / "factors.safetensors"))
    del factors["t1::fc.weight::up"]
    save_file(factors, str(broken / "factors.safetensors"))
    with pytest.raises(TwinBundleError) as err:
        twin.load(broken, Tiny())
    msg = str(err.value)
    assert "factor 'up' of tensor 'fc.weight' for task 't1' is missing" in msg
    assert "\n" not in msg


def test_missing_file_and_modified_file(bundle_dir: Path, tmp_path: Path):
    broken = _copy(bundle_dir, tmp_path / "b")
    (broken / "factors.safetensors").unlink()
    with pytest.raises(TwinBundleError, match="'factors.safetensors' listed in twin.json is "
                                              "missing"):
        twin.load(broken, Tiny())
    changed = _copy(bundle_dir, tmp_path / "c")
    state = load_file(str(changed / "router.safetensors"))
    state["out.bias"] = state["out.bias"] + 1
    save_file(state, str(changed / "router.safetensors"))
    with pytest.raises(TwinBundleError, match="router.safetensors' does not match its checksum"):
        twin.load(changed, Tiny())


def test_router_that_does_not_match_the_experts(bundle_dir: Path, tmp_path: Path):
    broken = _copy(bundle_dir, tmp_path / "b")
    save_file({k: v.contiguous() for k, v in TwinRouter(6, 3).state_dict().items()},
              str(broken / "router.safetensors"))
    with pytest.raises(TwinBundleError, match="router predicts 3 tasks but the bundle has 2 "
                                              "experts"):
        twin.load(broken, Tiny())
    wide = _copy(bundle_dir, tmp_path / "w")
    save_file({k: v.contiguous() for k, v in TwinRouter(7, 2).state_dict().items()},
              str(wide / "router.safetensors"))
    model = twin.load(wide, Tiny(), verify=False)
    with pytest.raises(MethodError, match="width 7"):
        model(torch.zeros(2, 3, dtype=torch.long))
