"""Bad input to compress, rebuild, merge-stream, stats, bench, twin and eval: one line on stderr, a
non-zero exit, nothing written."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import save_gpt2_family, write_recipe
from tests.faults.helpers import assert_one_line, remount_read_only, tmpfs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, experts = save_gpt2_family(root, n_experts=2)
    return base, experts


@pytest.fixture(scope="module")
def bundle(family, tmp_path_factory):
    from modelalloy.bundle import compress_to, lazy_state

    base, experts = family
    path = tmp_path_factory.mktemp("bundles") / "good"
    compress_to(path, lazy_state(base), {f"t{i}": lazy_state(e) for i, e in enumerate(experts)})
    return path


@pytest.mark.parametrize("args, needle", [
    (["--mask-lambda", "abc"], "'abc' is not a number"),
    (["--mask-lambda", "nan"], "finite number"),
    (["--names", "a,b,c"], "--names has 3 names for 2 experts"),
    (["--density", "1.5", "--base-merge", "ties"], "density must be in (0, 1]"),
])
def test_compress_bad_options(tmp_path, run_cli, family, args, needle):
    base, experts = family
    assert_one_line(run_cli("compress", base, *experts, "--out", tmp_path / "b", *args), needle)
    assert os.listdir(tmp_path) == []


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    meta = edit(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))


def _shape_changed(meta):
    name = next(iter(meta["shapes"]))
    meta["shapes"][name] = [d + 1 for d in meta["shapes"][name]]
    return meta


def _first_mask(bundle: Path) -> Path:
    return bundle / "masks" / "model.safetensors"


def _truncate_mask(bundle: Path) -> None:
    mask = _first_mask(bundle)
    with open(mask, "r+b") as f:
        f.truncate(mask.stat().st_size - 64)


def _flip_a_mask_byte(bundle: Path) -> None:
    mask = _first_mask(bundle)
    data = bytearray(mask.read_bytes())
    data[-1] ^= 0xFF
    mask.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, needle", [
    (lambda b: _edit_manifest(b, lambda m: {k: v for k, v in m.items() if k != "shapes"}),
     "has no 'shapes'"),
    (lambda b: _edit_manifest(b, lambda m: [m]), "is not a JSON object"),
    (lambda b: _edit_manifest(b, _shape_changed), "'shapes' but the base disagrees"),
    (_truncate_mask, "the manifest says"),
    (_flip_a_mask_byte, "does not match its SHA-256 sum"),
    (lambda b: (b / "masks" / "extra.safetensors").write_bytes(b"x"), "a file added"),
    (lambda b: (b / "bundle.json").write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
])
def test_rebuild_refuses_a_tampered_bundle(tmp_path, run_cli, bundle, tamper, needle):
    damaged = _copy(bundle, tmp_path / "bundle")
    tamper(damaged)
    assert_one_line(run_cli("rebuild", damaged, "--task", "t0", "--out", tmp_path / "out"), needle)
    assert os.listdir(tmp_path) == ["bundle"]


def test_rebuild_of_an_intact_bundle_matches_the_formula(tmp_path, run_cli, bundle):
    from modelalloy.bundle import TallBundle

    result = run_cli("rebuild", bundle, "--task", "1", "--out", tmp_path / "out")
    assert result.code == 0, result.err
    expected = TallBundle.load(bundle).rebuild("t1")
    from modelalloy.io import open_checkpoint

    with open_checkpoint(tmp_path / "out") as ck:
        for name, tensor in expected.items():
            assert torch.equal(ck.get(name), tensor), name


def test_merge_stream_bad_alpha(tmp_path, run_cli, family):
    base, experts = family
    args = ("merge-stream", base, *experts, "--out", tmp_path / "o", "--alpha")
    assert_one_line(run_cli(*args, "abc"), "--alpha")
    assert_one_line(run_cli(*args, "2"), "'alpha' = 2.0 is out of range", "<= 1.0")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["gzip", "binary", "vocab", "negative"])
def test_stats_bad_data_files(tmp_path, run_cli, family, kind):
    base, _ = family
    data = tmp_path / "data.jsonl"
    if kind == "gzip":
        data.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 10))
        needle = "gzip-compressed"
    elif kind == "binary":
        data.write_bytes(bytes(range(256)) * 4)
        needle = "binary"
    elif kind == "vocab":
        data.write_text(json.dumps({"input_ids": [1, 2, 64]}) + "\n")  # vocabulary: 64
        needle = "token id 64 is beyond the model's vocabulary (64 tokens)"
    else:
        data.write_text(json.dumps({"input_ids": [1, -2]}) + "\n")
        needle = "non-negative integer token ids"
    out = tmp_path / "s.safetensors"
    assert_one_line(run_cli("stats", base, "--data", data, "--kind", "gram", "--out", out), needle)
    assert not out.exists() and not (base / "stats").exists()


def test_bench_bad_params(tmp_path, run_cli):
    assert_one_line(run_cli("bench", "--params", "{oops", "--out", tmp_path / "b"),
              "--params is not valid JSON")
    assert_one_line(run_cli("bench", "--params", "[1]", "--out", tmp_path / "b"),
              "--params must map method names")
    assert os.listdir(tmp_path) == []


def test_eval_unknown_split(run_cli):
    assert_one_line(run_cli("eval", "base", "--split", "nosuch"), "--split 'nosuch'", "test, val")


@pytest.mark.parametrize("meta, needle", [
    ({"format": "other", "version": "1", "kind": "gram"}, "not a modelalloy statistics file"),
    ({"format": "modelalloy.stats", "version": "9", "kind": "gram"}, "version '9'"),
    ({"format": "modelalloy.stats", "version": "1", "kind": "fisher"}, "holds 'fisher'"),
])
def test_statistics_with_wrong_format_metadata_are_refused(tmp_path, run_cli, meta, needle):
    base, experts = save_gpt2_family(tmp_path, n_experts=2)
    for expert in experts:
        (expert / "stats").mkdir()
        save_file({"transformer.h.0.attn.c_attn.weight": torch.eye(32)},
                  expert / "stats" / "gram.safetensors", metadata=meta)
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: regmean\nmodels:\n" + "".join(
        f"  - model: {e}\n" for e in experts))
    assert_one_line(run_cli("merge", recipe, tmp_path / "out"), "gram.safetensors", needle)
    assert not (tmp_path / "out").exists()


def test_stats_next_to_a_read_only_model(tmp_path, run_cli, family):
    import shutil

    base, _ = family
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    with tmpfs(tmp_path / "ro", "4m") as mount:
        model = Path(shutil.copytree(base, mount / "model"))
        remount_read_only(mount)
        assert_one_line(run_cli("stats", model, "--data", data, "--kind", "gram"),
                        str(model / "stats"), "read-only", "--out")
        assert sorted(os.listdir(model)) == sorted(os.listdir(base))


@pytest.mark.parametrize("flag, value, needles", [
    ("--methods", "ties,tiez", ("--methods: unknown merge method 'tiez'", "did you mean 'ties'")),
    ("--sweep", "{", ("--sweep: unknown merge method '{'", "available: ")),
])
def test_bench_bad_method_names_fail_before_the_suite(tmp_path, run_cli, monkeypatch, flag,
                                                      value, needles):
    import modelalloy.bench

    def no_suite(*args, **kwargs):
        raise AssertionError("the suite was built before the options were checked")

    monkeypatch.setattr(modelalloy.bench, "load_suite", no_suite)
    assert_one_line(run_cli("bench", flag, value, "--out", tmp_path / "b"), *needles)
    assert os.listdir(tmp_path) == []


def test_twin_build_refuses_a_fifo_as_router_data(tmp_path, run_cli, family):
    base, experts = family
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: ties\nbase_model: {base}\n"
                          "models:\n" + "".join(f"  - model: {e}\n" for e in experts))
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "bundle"
    assert_one_line(run_cli("twin", "build", recipe, "--out", out, "--data", fifo),
                    f"{fifo}: router data file is a FIFO, not a regular file")
    assert not out.exists()


@pytest.mark.parametrize("size", ["0", "-3"])
def test_stats_batch_size_below_one(tmp_path, run_cli, family, size):
    base, _ = family
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    out = tmp_path / "s.safetensors"
    assert_one_line(run_cli("stats", base, "--data", data, "--batch-size", size, "--out", out),
                    "--batch-size", "greater than or equal to 1")
    assert not out.exists() and not (base / "stats").exists()
