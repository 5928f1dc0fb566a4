"""open_checkpoint: formats, laziness, thread safety, and every refusal."""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelalloy.errors import CheckpointError
from modelalloy.io import Checkpoint, TensorInfo, open_checkpoint
from tests.io.io_helpers import tiny_state_dict, write_raw_safetensors


def assert_one_line_error(excinfo, *needles: object) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    return msg


def assert_same(ck: Checkpoint, sd: dict[str, torch.Tensor]) -> None:
    assert sorted(ck.names()) == sorted(sd)
    for k, v in sd.items():
        t = ck.get(k)
        assert t.dtype == v.dtype and t.shape == v.shape, k
        assert torch.equal(t, v), k


# --------------------------------------------------------------------------- formats


def test_hf_sharded_and_unsharded_are_identical(gpt2_dirs):
    single, sharded, model = gpt2_dirs
    assert (sharded / "model.safetensors.index.json").is_file()
    with open_checkpoint(single) as a, open_checkpoint(sharded) as b:
        assert len(b.files) > 1 and len(a.files) == 1
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            assert a.info(name).shape == b.info(name).shape
            assert torch.equal(a.get(name), b.get(name)), name
        assert a.config == b.config and a.config["model_type"] == "gpt2"
        sd = model.state_dict()
        assert torch.equal(a.get("transformer.wte.weight"), sd["transformer.wte.weight"])
        # storage order: shard by shard, data order inside each
        wm = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
        shards = [wm[n] for n in b.names()]
        assert shards == sorted(shards) and set(b.names()) == set(wm)


def test_single_safetensors_file_in_file_order(tmp_path):
    sd = tiny_state_dict()
    f = tmp_path / "m.safetensors"
    save_file(sd, f)
    with open_checkpoint(str(f)) as ck:
        assert ck.path == f and ck.config is None
        assert_same(ck, sd)
        info = ck.info("layers.0.w")
        assert info == TensorInfo("layers.0.w", (8, 8), torch.bfloat16, 128, f)
        header = json.loads(f.read_bytes()[8 : 8 + struct.unpack("<Q", f.read_bytes()[:8])[0]])
        offsets = [header[n]["data_offsets"][0] for n in ck.names()]
        assert offsets == sorted(offsets)
        assert "steps" in ck and len(ck) == len(sd)
        assert ck.total_nbytes == sum(v.numel() * v.element_size() for v in sd.values())


def test_get_is_lazy_and_thread_safe(tmp_path):
    sd = {f"t{i}": torch.randn(64, 64) for i in range(16)}
    save_file(sd, tmp_path / "model.safetensors")
    ck = open_checkpoint(tmp_path)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for k in range(50):
                name = f"t{(offset + k) % 16}"
                assert torch.equal(ck.get(name), sd[name])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ck.close()
    with pytest.raises(ValueError):
        ck.get("t0")


def test_reads_do_not_keep_memory(tmp_path):
    """Reading a whole model leaves RSS where it was (no memory map keeping pages resident)."""
    psutil = pytest.importorskip("psutil")
    sd = {f"t{i}": torch.full((512, 1024), float(i)) for i in range(48)}  # 48 x 2 MiB
    save_file(sd, tmp_path / "model.safetensors")
    del sd
    proc = psutil.Process()
    with open_checkpoint(tmp_path) as ck:
        ck.get("t0")
        before = proc.memory_info().rss
        for name in ck.names():
            assert ck.get(name)[0, 0].item() == float(name[1:])
        grown = proc.memory_info().rss - before
    assert grown < 40 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB reading 96 MiB"


def test_tensors_are_owned_and_writable(tmp_path):
    save_file({"a": torch.zeros(4)}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ck:
        ck.get("a").add_(1)
        assert ck.get("a").sum() == 0


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_get_into_a_given_buffer(tmp_path, fmt):
    sd = tiny_state_dict()
    if fmt == "safetensors":
        save_file(sd, tmp_path / "model.safetensors")
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ck:
        buf = torch.empty(8, 8, dtype=torch.bfloat16)
        assert ck.get("layers.0.w", out=buf) is buf and torch.equal(buf, sd["layers.0.w"])
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            ck.get("layers.0.w", out=torch.empty(8, 8))
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            ck.get("layers.0.w", out=torch.empty(8, 8, dtype=torch.bfloat16).t())


def test_unknown_tensor_name(tmp_path):
    save_file(tiny_state_dict(), tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ck, pytest.raises(CheckpointError) as e:
        ck.get("nope")
    assert_one_line_error(e, "nope", tmp_path)


def test_bin_file_and_folder_weights_only(tmp_path):
    sd = tiny_state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path / "pytorch_model.bin") as ck:
        assert_same(ck, sd)
    (tmp_path / "config.json").write_text('{"model_type": "x"}')
    with open_checkpoint(tmp_path) as ck:
        assert_same(ck, sd)
        assert ck.config == {"model_type": "x"}


def test_sharded_bin_with_index(tmp_path):
    sd = tiny_state_dict()
    names = list(sd)
    parts = {
        "pytorch_model-00001-of-00002.bin": names[:2],
        "pytorch_model-00002-of-00002.bin": names[2:],
    }
    wm = {}
    for fname, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, tmp_path / fname)
        wm.update({k: fname for k in keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with open_checkpoint(tmp_path) as ck:
        assert ck.names() == names  # storage order
        assert_same(ck, sd)
        assert ck.info(names[3]).file == tmp_path / "pytorch_model-00002-of-00002.bin"


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_nested_state_dict_unwrapped(tmp_path, wrapper):
    sd = tiny_state_dict()
    torch.save({wrapper: sd, "epoch": 3}, tmp_path / "ckpt.pt")
    with open_checkpoint(tmp_path / "ckpt.pt") as ck:
        assert_same(ck, sd)


def test_legacy_pickle_format(tmp_path):
    sd = tiny_state_dict()
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "old.pth") as ck:
        assert_same(ck, sd)


def test_pickle_with_non_tensor_values(tmp_path):
    torch.save({"w": torch.zeros(2), "lr": 0.1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "x.pt")
    assert_one_line_error(e, "x.pt", "'lr'")


class _Evil:
    """Unpickling this would create the marker directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("kind", ["zip", "legacy", "folder"])
def test_malicious_pickle_is_refused_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = {"w": torch.zeros(2), "x": _Evil(marker)}
    if kind == "zip":
        path = tmp_path / "evil.pt"
        torch.save(payload, path)
    elif kind == "legacy":
        path = tmp_path / "evil.bin"
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        (tmp_path / "m").mkdir()
        path = tmp_path / "m" / "pytorch_model.bin"
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path.parent if kind == "folder" else path)
    assert_one_line_error(
        e, "refusing to execute code in pickle", path, "convert it to safetensors"
    )
    assert not marker.exists()


def test_hf_cache_style_symlinked_shards_are_fine(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    sd = tiny_state_dict()
    save_file(sd, blobs / "abc123")
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blobs / "abc123")
    with open_checkpoint(snap) as ck:
        assert_same(ck, sd)


def test_shards_without_index_and_other_names(tmp_path):
    sd = tiny_state_dict()
    names = list(sd)
    save_file({k: sd[k] for k in names[:3]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in names[3:]}, tmp_path / "model-00002-of-00002.safetensors")
    with open_checkpoint(tmp_path) as ck:
        assert_same(ck, sd)
    other = tmp_path / "other"
    other.mkdir()
    save_file(sd, other / "diffusion_pytorch_model.safetensors")
    with open_checkpoint(other) as ck:
        assert_same(ck, sd)


def test_prefers_safetensors_over_bin(tmp_path):
    sd = tiny_state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ck:
        assert_same(ck, sd)


# --------------------------------------------------------------------------- refusals


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "nothere")
    assert_one_line_error(e, "nothere", "no such file")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint("someorg/some-model-that-is-not-local")
    assert_one_line_error(e, "huggingface-cli download")


def test_empty_folder_and_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, tmp_path, "empty")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"not looked at")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, tmp_path, "no weights")


def test_invalid_config_json(tmp_path):
    save_file(tiny_state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, tmp_path / "config.json", "invalid config.json")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "w.npz")
    assert_one_line_error(e, "w.npz", "unsupported")


def _good(tmp_path: Path) -> Path:
    f = tmp_path / "model.safetensors"
    save_file(tiny_state_dict(), f)
    return f


def _corrupt(tmp_path, header, data=b"", pad=True):
    return write_raw_safetensors(tmp_path / "model.safetensors", header, data, pad)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DUP_HEADER = b'{"a":' + json.dumps(F32).encode() + b',"a":' + json.dumps(F32).encode() + b"}"


def _raw_header(raw: bytes) -> bytes:
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: (p / "model.safetensors").write_bytes(b"\x01\x02"), "truncated"),
        (
            lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 500) + b"{}"),
            "truncated",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}"),
            "implausible",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(_good(p).read_bytes()[:-10]),
            "truncated",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"{nojson}"),
            "not valid JSON",
        ),
        (lambda p: _corrupt(p, ["a"]), "not a JSON object"),
        (lambda p: _corrupt(p, {"a": {**F32, "dtype": "F33"}}, b"\0" * 8), "unknown dtype"),
        (lambda p: _corrupt(p, {"a": {**F32, "shape": [3]}}, b"\0" * 8), "needs 12"),
        (lambda p: _corrupt(p, {"a": {**F32, "shape": [-2]}}, b"\0" * 8), "invalid shape"),
        (lambda p: _corrupt(p, {"a": {**F32, "data_offsets": [8, 0]}}, b"\0" * 8), "data_offsets"),
        (lambda p: _corrupt(p, {"a": {**F32, "data_offsets": [8, 16]}}, b"\0" * 8), "past the end"),
        (
            lambda p: _corrupt(p, {"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12),
            "overlap",
        ),
        (
            lambda p: _corrupt(p, {"a": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12),
            "unindexed",
        ),
        (lambda p: _corrupt(p, {"a": F32}, b"\0" * 12), "after the last tensor"),
        (lambda p: _corrupt(p, {"a": F32, "__metadata__": [1]}, b"\0" * 8), "__metadata__"),
        (
            lambda p: (p / "model.safetensors").write_bytes(_raw_header(DUP_HEADER) + b"\0" * 8),
            "twice",
        ),
    ],
    ids=[
        "shorter-than-8",
        "header-past-eof",
        "huge-header-length",
        "data-truncated",
        "bad-json",
        "header-not-object",
        "unknown-dtype",
        "size-mismatch",
        "negative-shape",
        "reversed-offsets",
        "offsets-past-end",
        "overlap",
        "gap",
        "trailing-bytes",
        "bad-metadata",
        "duplicate-key",
    ],
)
def test_corrupt_safetensors(tmp_path, make, needle):
    make(tmp_path)
    f = tmp_path / "model.safetensors"
    for target in (f, tmp_path):  # as a file and as a folder
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(target)
        assert_one_line_error(e, f, needle)


def test_real_file_passes_own_validation_and_library(tmp_path):
    f = _good(tmp_path)
    from modelalloy.io.checkpoint import read_safetensors_header

    entries, meta = read_safetensors_header(f)
    assert {e.name for e in entries} == set(tiny_state_dict())


def _sharded(tmp_path: Path) -> tuple[dict, dict]:
    sd = tiny_state_dict()
    names = list(sd)
    wm = {}
    for i, keys in enumerate((names[:2], names[2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in keys}, tmp_path / fname)
        wm.update({k: fname for k in keys})
    return sd, wm


def _write_index(tmp_path: Path, wm: dict) -> Path:
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    return idx


def test_index_consistent_reads(tmp_path):
    sd, wm = _sharded(tmp_path)
    _write_index(tmp_path, wm)
    with open_checkpoint(tmp_path) as ck:
        assert_same(ck, sd)


@pytest.mark.parametrize("bad", ["../x.safetensors", "/abs/x.safetensors", "a/../../x.safetensors"])
def test_index_pointing_outside_folder(tmp_path, bad):
    sd, wm = _sharded(tmp_path)
    wm[next(iter(wm))] = bad
    idx = _write_index(tmp_path, wm)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, idx, "outside the model folder", bad)


def test_index_shard_missing(tmp_path):
    sd, wm = _sharded(tmp_path)
    idx = _write_index(tmp_path, wm)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, idx, "model-00002-of-00002.safetensors", "missing")


def test_index_names_wrong_shard(tmp_path):
    sd, wm = _sharded(tmp_path)
    wm["embed.weight"] = "model-00002-of-00002.safetensors"
    idx = _write_index(tmp_path, wm)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, idx, "'embed.weight'", "model-00001-of-00002.safetensors")


def test_index_names_tensor_no_shard_has(tmp_path):
    sd, wm = _sharded(tmp_path)
    wm["ghost"] = "model-00001-of-00002.safetensors"
    idx = _write_index(tmp_path, wm)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, idx, "'ghost'")


def test_index_missing_a_tensor_the_shards_have(tmp_path):
    sd, wm = _sharded(tmp_path)
    del wm["steps"]
    idx = _write_index(tmp_path, wm)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, idx, "'steps'", "not in the index")


def test_index_bad_json_and_no_weight_map(tmp_path):
    _sharded(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text("{oops")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, idx, "invalid JSON")
    idx.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, idx, "weight_map")


@pytest.mark.parametrize("with_index", [False, True])
def test_duplicate_tensor_across_shards(tmp_path, with_index):
    sd, wm = _sharded(tmp_path)
    # shard 2 also carries embed.weight
    extra = {k: sd[k] for k in list(sd)[2:]} | {"embed.weight": sd["embed.weight"]}
    save_file(extra, tmp_path / "model-00002-of-00002.safetensors")
    if with_index:
        _write_index(tmp_path, wm)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(
        e, "'embed.weight'", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    )


def test_duplicate_tensor_across_bin_shards(tmp_path):
    sd = tiny_state_dict()
    torch.save(sd, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"steps": sd["steps"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert_one_line_error(e, "'steps'", "pytorch_model-00002-of-00002.bin")


def test_truncated_pickle(tmp_path):
    torch.save(tiny_state_dict(), tmp_path / "w.bin")
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "w.bin")
    assert_one_line_error(e, "w.bin", "re-download")


def test_single_file_preferred_over_index_like_transformers(tmp_path):
    sd, wm = _sharded(tmp_path)
    _write_index(tmp_path, wm)
    only = {"solo": torch.ones(3)}
    save_file(only, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ck:
        assert_same(ck, only)


def test_metadata_values_must_be_strings(tmp_path):
    f = _corrupt(tmp_path, {"a": F32, "__metadata__": {"format": 1}}, b"\0" * 8)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(f)
    assert_one_line_error(e, f, "__metadata__")


def test_fuzzed_headers_never_pass_validation_and_then_fail(tmp_path):
    """Whatever our validator accepts, the safetensors library must read (differential fuzz)."""
    from modelalloy.io.checkpoint import read_safetensors_header

    good = tmp_path / "good.safetensors"
    save_file(tiny_state_dict(), good)
    raw = bytearray(good.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(0)
    accepted = 0
    for i in range(300):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(0, 8 + n)
            data[pos] = rng.choice(b'0123456789[]{}",:FIUB ' + bytes([rng.randrange(256)]))
        f = tmp_path / f"f{i}.safetensors"
        f.write_bytes(bytes(data))
        try:
            entries, _ = read_safetensors_header(f)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(f) in str(e)
            continue
        accepted += 1
        with open_checkpoint(f) as ck, safe_open(str(f), framework="pt") as lib:
            assert sorted(lib.keys()) == sorted(ck.names())
            for name in ck.names():
                t = ck.get(name)
                assert tuple(t.shape) == ck.info(name).shape
                assert torch.equal(
                    t.reshape(-1).view(torch.uint8),
                    lib.get_tensor(name).reshape(-1).view(torch.uint8),
                )
    assert 0 < accepted < 300


def test_read_fallback_without_preadv(tmp_path, monkeypatch):
    import modelalloy.io.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_HAS_PREADV", False)
    sd = tiny_state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ck:
        assert_same(ck, sd)


def test_close_waits_for_reads_in_flight(tmp_path):
    sd = {f"t{i}": torch.randn(256, 256) for i in range(8)}
    save_file(sd, tmp_path / "model.safetensors")
    ck = open_checkpoint(tmp_path)
    fd = ck._acquire_fd(ck.info("t0").file)  # a read in flight
    ck.close()
    assert os.pread(fd, 8, 0)  # still open: the reader finishes first
    ck._release()
    with pytest.raises(OSError):
        os.pread(fd, 8, 0)


def _page_cached(path: Path, offset: int) -> bool | None:
    """Whether the page holding ``offset`` of ``path`` is cached, or None where this machine
    cannot tell (no RWF_NOWAIT, or a filesystem that does not honour it)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(1)], offset, flag) == 1
    except BlockingIOError:
        return False
    except OSError:
        return None
    finally:
        os.close(fd)


def test_prefetch_asks_for_uncached_tensors_only(tmp_path):
    """A tensor whose pages were dropped is hinted (and comes into the page cache without a
    read); one that is cached is not; in-memory and empty tensors never are."""
    file = tmp_path / "model.safetensors"
    save_file({"big": torch.arange(4 << 20, dtype=torch.float32),
               "empty": torch.zeros(0)}, file)
    with open_checkpoint(tmp_path) as ck:
        ck.get("big")
        start = ck._offsets["big"]
        if not _page_cached(file, start):
            pytest.skip("this filesystem cannot tell cached pages (RWF_NOWAIT)")
        assert ck.prefetch("big") is False  # just read: nothing to ask for
        assert ck.prefetch("empty") is False
        # Whether dropped pages stay dropped is probed on another file: a probe that misses
        # starts the kernel's readahead, which would bring the tensor back before the hint.
        probe = tmp_path / "probe.bin"
        probe.write_bytes(os.urandom(1 << 16))
        for path in (probe, file):
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        if _page_cached(probe, 0):
            pytest.skip("this filesystem keeps its pages (e.g. tmpfs): nothing to prefetch")
        assert ck.prefetch("big") is True
        deadline = time.time() + 10
        while not _page_cached(file, start) and time.time() < deadline:
            time.sleep(0.01)
        assert _page_cached(file, start), "the hint did not bring the tensor's first page in"
        assert torch.equal(ck.get("big"), torch.arange(4 << 20, dtype=torch.float32))


def test_prefetch_of_pickles_and_closed_checkpoints_is_a_no_op(tmp_path):
    torch.save({"a": torch.ones(3)}, tmp_path / "model.bin")
    with open_checkpoint(tmp_path / "model.bin") as ck:
        assert ck.prefetch("a") is False
    save_file({"a": torch.ones(3)}, tmp_path / "model.safetensors")
    ck = open_checkpoint(tmp_path / "model.safetensors")
    ck.close()
    assert ck.prefetch("a") is False
    assert ck.prefetch("missing") is False
