"""Property-based tests of the readers that take untrusted bytes: safetensors headers, shard
indexes, recipes, and bundles. Whatever the bytes, a reader returns or raises a one-line
ModelAlloyError: no other exception, no hang (a deadline per example), and no allocation
driven by what the file claims rather than by its size (tracemalloc's peak stays within a
small multiple of the file's size)."""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelalloy.errors import ModelAlloyError
from modelalloy.io.checkpoint import open_checkpoint, read_safetensors_header
from modelalloy.recipe import parse_recipe

SETTINGS = settings(max_examples=60, deadline=2000, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


def _bounded(call, size: int):
    """Run ``call``; only a one-line ModelAlloyError may escape; Python allocations stay
    within 64x the input's size plus 1 MiB."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except ModelAlloyError as err:
            assert "\n" not in str(err)
            result = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 64 * size + (1 << 20), f"allocated {peak} bytes for {size} bytes of input"
    return result


# --------------------------------------------------------------------------- safetensors


def _header_file(header: object, data: bytes, claimed: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


tensor_entries = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", 3]),
        "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=3), json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 2**62), min_size=2, max_size=2),
                                  json_values),
    }),
    max_size=4)


def _valid_file(shapes: list[list[int]]) -> bytes:
    from safetensors.torch import save

    return save({f"t{i}": torch.arange(float(torch.Size(s).numel())).reshape(s)
                 for i, s in enumerate(shapes)})


def _damaged(blob: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(blob[: max(0, len(blob) - cut)])
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    return bytes(data)


valid_files = st.builds(_valid_file, st.lists(st.lists(st.integers(0, 4), max_size=2),
                                              min_size=1, max_size=3))


@SETTINGS
@given(blob=st.one_of(
    st.binary(max_size=256),
    valid_files,
    st.builds(_damaged, valid_files, st.integers(0, 16),
              st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3)),
    st.builds(_header_file, tensor_entries, st.binary(max_size=64)),
    st.builds(_header_file, json_values, st.binary(max_size=16)),
    st.builds(_header_file, tensor_entries, st.binary(max_size=16),
              st.integers(0, 2**64 - 1)),
))
def test_safetensors_reader_never_crashes(tmp_path, blob):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    _bounded(lambda: read_safetensors_header(path), len(blob))

    def read_all():
        with open_checkpoint(path) as ck:
            for name in ck.names():
                assert ck.info(name).nbytes <= len(blob)  # validated against the file
                ck.get(name)

    _bounded(read_all, len(blob))


# --------------------------------------------------------------------------- shard index


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shard") / "model-00001-of-00001.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, path)
    return path


@SETTINGS
@given(index=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(lambda wm: json.dumps({"weight_map": wm}).encode(),
              st.dictionaries(st.sampled_from(["a", "b", "c"]),
                              st.sampled_from(["model-00001-of-00001.safetensors", "../x",
                                               "/etc/passwd", "", "missing.safetensors"])
                              | json_values, max_size=3)),
))
def test_shard_index_reader_never_crashes(tmp_path, shard, index):
    folder = tmp_path / "model"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    shutil.copy(shard, folder / shard.name)
    (folder / "model.safetensors.index.json").write_bytes(index)

    def read():
        with open_checkpoint(folder) as ck:
            assert set(ck.names()) <= {"a", "b"}

    _bounded(read, len(index) + shard.stat().st_size)


# --------------------------------------------------------------------------- recipes


yaml_like = st.one_of(
    st.text(max_size=300),
    st.builds(lambda v: json.dumps(v), json_values),  # JSON is YAML
    st.builds(lambda method, models, params: json.dumps(
        {"merge_method": method, "models": models, "parameters": params}),
        st.sampled_from(["linear", "ties", "slerp", "nosuch", 3]),
        st.lists(st.one_of(st.fixed_dictionaries({"model": st.text(max_size=8)}), json_values),
                 max_size=3),
        json_values),
)


@SETTINGS
@given(text=yaml_like)
def test_recipe_loader_never_crashes(tmp_path, text):
    _bounded(lambda: parse_recipe(text, source="fuzz.yaml", base_dir=tmp_path),
             len(text.encode()))


# --------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from modelalloy.bundle import compress_to

    root = tmp_path_factory.mktemp("bundle")
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=gen), "n": torch.arange(3)}
    experts = {t: {"w": base["w"] + torch.randn(4, 3, generator=gen), "n": base["n"]}
               for t in ("a", "b")}
    compress_to(root / "b", base, experts)
    return root / "b"


def _mutations(meta: dict):
    keys = sorted(meta)
    return st.one_of(
        st.builds(lambda k, v: {**meta, k: v}, st.sampled_from(keys), json_values),
        st.builds(lambda k: {x: y for x, y in meta.items() if x != k}, st.sampled_from(keys)),
        st.builds(lambda k, v: {**meta, "config": {**meta["config"], k: v}},
                  st.sampled_from(sorted(meta["config"])), json_values),
        st.builds(lambda v: {**meta, "shapes": {"w": v}}, json_values),
        json_values,
    )


@SETTINGS
@given(data=st.data())
def test_bundle_reader_never_crashes(tmp_path, bundle, data):
    from modelalloy.bundle.tall import TallBundle

    meta = json.loads((bundle / "bundle.json").read_text())
    raw = data.draw(st.one_of(st.binary(max_size=200),
                              st.builds(lambda m: json.dumps(m).encode(), _mutations(meta))))
    copy = tmp_path / "b"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    (copy / "bundle.json").write_bytes(raw)
    size = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file())
    loaded = _bounded(lambda: TallBundle.load(copy), size)
    if loaded is not None:  # only an unchanged manifest can be accepted
        assert json.loads(raw) == meta
