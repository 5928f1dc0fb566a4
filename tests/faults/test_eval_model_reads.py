"""`modelalloy eval` and the harness's load_model_folder read models through the validated
checkpoint reader: a bad shard is a one-line error naming the file, never a hang or a
traceback from the safetensors library."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelalloy.errors import CheckpointError
from modelalloy.eval.harness import load_model_folder
from tests.faults.helpers import assert_one_line

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def sharded_folder(root: Path, index: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    """Two safetensors shards (and their index): a.weight in the first, b.* in the second."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 3, generator=gen),
               "b.weight": torch.randn(5, generator=gen),
               "b.bias": torch.randn(2, 2, generator=gen).to(torch.bfloat16)}
    folder = root / "model"
    folder.mkdir()
    save_file({"a.weight": tensors["a.weight"]}, str(folder / SHARD1))
    save_file({k: tensors[k] for k in ("b.weight", "b.bias")}, str(folder / SHARD2))
    if index:
        weight_map = {"a.weight": SHARD1, "b.weight": SHARD2, "b.bias": SHARD2}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, tensors


def one_line_error(folder: Path, needle: str) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model_folder(folder)
    text = str(err.value)
    assert "\n" not in text and needle in text, text
    return text


def test_a_sharded_folder_reads_every_tensor_bit_for_bit(tmp_path):
    folder, want = sharded_folder(tmp_path)
    got = load_model_folder(folder)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_a_truncated_shard_is_named(tmp_path):
    folder, _ = sharded_folder(tmp_path)
    shard = folder / SHARD2
    shard.write_bytes(shard.read_bytes()[:-7])
    text = one_line_error(folder, str(shard))
    assert "truncated" in text or "end" in text, text


def test_a_corrupt_header_is_named(tmp_path):
    folder, _ = sharded_folder(tmp_path)
    shard = folder / SHARD1
    raw = bytearray(shard.read_bytes())
    raw[:8] = (1 << 40).to_bytes(8, "little")  # a header length no file could hold
    shard.write_bytes(bytes(raw))
    one_line_error(folder, f"{shard}: header length")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("index", [True, False], ids=["indexed", "no-index"])
def test_a_fifo_in_place_of_a_shard_is_refused_without_blocking(tmp_path, index):
    folder, _ = sharded_folder(tmp_path, index=index)
    (folder / SHARD2).unlink()
    os.mkfifo(folder / SHARD2)  # reading it would wait for a writer forever
    one_line_error(folder, f"{folder / SHARD2}: the safetensors file is a FIFO")


def test_a_folder_in_place_of_a_shard_is_refused(tmp_path):
    folder, _ = sharded_folder(tmp_path)
    (folder / SHARD1).unlink()
    (folder / SHARD1).mkdir()
    one_line_error(folder, f"{folder / SHARD1}: the safetensors file is a folder")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_fifo_named_as_the_single_weight_file_is_refused(tmp_path, name):
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / name)
    one_line_error(folder, f"{folder / name}: the ")


@pytest.mark.timeout(60)
def test_eval_command_names_the_bad_shard_in_one_line(tmp_path, run_cli):
    folder, _ = sharded_folder(tmp_path)
    shard = folder / SHARD2
    shard.write_bytes(shard.read_bytes()[:20])
    # the model is read before the suite: no suite is built for a model that cannot load
    args = ("--suite", "tiny-vision", "--size", "smoke")
    assert_one_line(run_cli("eval", folder, *args), str(shard), "truncated")
    shard.unlink()
    os.mkfifo(shard)
    assert_one_line(run_cli("eval", folder, *args), str(shard), "FIFO, not a regular file")
    shard.unlink()
    shutil.rmtree(folder)
    assert_one_line(run_cli("eval", folder, *args), str(folder), "no such file or folder")
