"""`modelalloy merge-stream` runs through the one driver (the recipe method opcm over the models
in arrival order): the same bits as the continual merger it called before, and every check of
a merge (missing tensors, shapes, NaN/Inf inputs) with nothing written on failure."""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelalloy.bundle._checkpoint import lazy_state
from modelalloy.continual import OPCM
from modelalloy.io.checkpoint import read_state_dict
from tests.faults.helpers import assert_one_line

# unsorted names, an embedding (not projected), a bias, an integer buffer, two dtypes
SHAPES = {"z.proj.weight": (9, 7), "model.embed.weight": (11, 7), "a.proj.weight": (7, 9),
          "a.proj.bias": (7,), "mid.weight": (5, 6)}


def _models(root, n_experts=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtypes = {"z.proj.weight": torch.bfloat16, "mid.weight": torch.bfloat16}
    base = {k: torch.randn(s, generator=gen).to(dtypes.get(k, torch.float32))
            for k, s in SHAPES.items()}
    base["position_ids"] = torch.arange(4)
    paths = []
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    for i in range(n_experts):
        expert = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                  if v.is_floating_point() else v for k, v in base.items()}
        if i == 1:  # a model folder, the others single files
            (root / "m1").mkdir()
            save_file(expert, str(root / "m1" / "model.safetensors"))
            paths.append(root / "m1")
        else:
            save_file(expert, str(root / f"m{i}.safetensors"))
            paths.append(root / f"m{i}.safetensors")
    return root / "base.safetensors", paths


def _before(base, paths, **options):
    """What merge-stream computed before it ran through the engine: OPCM over the whole base
    and each model read lazily, in arrival order."""
    merger = OPCM(read_state_dict(base), **options)
    for path in paths:
        incoming = lazy_state(path)
        try:
            merger.add(incoming)
        finally:
            incoming.checkpoint.close()
    return merger.merged(), merger.norms


@pytest.mark.parametrize("args, options", [
    ([], {}),
    (["--alpha", "0.2", "--exclude", "proj.bias|embed"], {"alpha": 0.2,
                                                         "exclude": "proj.bias|embed"}),
])
def test_merge_stream_is_the_continual_merger_bit_for_bit(tmp_path, run_cli, args, options):
    base, paths = _models(tmp_path / "in")
    res = run_cli("merge-stream", base, *paths, "--out", tmp_path / "out", *args)
    assert res.code == 0, res.err
    want, norms = _before(base, paths, **options)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    for step, norm in enumerate(norms, 1):  # the norms the merge found, per arrival
        assert f"[{step}/3] {paths[step - 1]}: ‖τ‖ = {norm:.4g}" in res.out
    # the merge's folder, as `modelalloy merge` writes it: its recipe records the order
    assert "merge_method: opcm" in (tmp_path / "out" / "modelalloy_recipe.yaml").read_text()


def test_merge_stream_shuffle_is_the_continual_merger_in_the_shuffled_order(tmp_path, run_cli):
    base, paths = _models(tmp_path / "in", seed=4)
    res = run_cli("merge-stream", base, *paths, "--out", tmp_path / "out", "--shuffle",
                  "--seed", "7")
    assert res.code == 0, res.err
    order = list(paths)
    random.Random(7).shuffle(order)
    assert order != paths
    want, _ = _before(base, order)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(got[n], t) for n, t in want.items())


def _broken(tmp_path, edit):
    base, paths = _models(tmp_path / "in")
    sd = load_file(str(paths[2]))
    edit(sd)
    save_file(sd, str(paths[2]))
    return base, paths


@pytest.mark.parametrize("edit, needles", [
    (lambda sd: sd.__setitem__("mid.weight", torch.full((5, 6), float("nan"),
                                                        dtype=torch.bfloat16)),
     ["m2.safetensors", "'mid.weight' has 30 NaN/Inf", "--allow-nonfinite"]),
    (lambda sd: sd.pop("a.proj.bias"), ["m2.safetensors", "missing 1 tensor", "a.proj.bias"]),
    (lambda sd: sd.__setitem__("a.proj.weight", torch.zeros(9, 7)),
     ["a.proj.weight", "shape [9, 7]", "[7, 9]"]),
])
def test_merge_stream_has_the_checks_of_a_merge(tmp_path, run_cli, edit, needles):
    base, paths = _broken(tmp_path, edit)
    assert_one_line(run_cli("merge-stream", base, *paths, "--out", tmp_path / "out"),
                    *needles)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_merge_stream_allows_nonfinite_inputs_when_asked(tmp_path, run_cli):
    def nan_at_one(sd):
        sd["mid.weight"][0, 0] = float("nan")

    base, paths = _broken(tmp_path, nan_at_one)
    res = run_cli("merge-stream", base, *paths, "--out", tmp_path / "out", "--allow-nonfinite")
    assert res.code == 0, res.err
    assert "warning:" in res.err and "'mid.weight' has 1 NaN/Inf" in res.err


def test_merge_stream_refuses_the_base_among_the_models(tmp_path, run_cli):
    base, paths = _models(tmp_path / "in")
    assert_one_line(run_cli("merge-stream", base, paths[0], base, "--out", tmp_path / "out"),
                    "is the base model itself")
    assert not (tmp_path / "out").exists()
