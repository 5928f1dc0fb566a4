"""A suite's files are read by io's validated reader: a missing file says to rebuild the suite,
a damaged one is the reader's one-line CheckpointError naming it; nothing else reads them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import modelalloy.bundle._checkpoint as bundle_checkpoint
from modelalloy.bench.common import SuiteError, load_split, load_state_dict
from modelalloy.errors import CheckpointError, ModelAlloyError


def test_a_suite_model_folder_round_trips(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = load_state_dict(tmp_path)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)


@pytest.mark.parametrize("read", [lambda p: load_state_dict(p), lambda p: load_split(p / "x")])
def test_a_missing_suite_file_says_to_rebuild(tmp_path, read):
    with pytest.raises(SuiteError) as err:
        read(tmp_path)
    assert "\n" not in str(err.value) and "modelalloy bench --rebuild" in str(err.value)


def test_a_truncated_suite_file_is_one_line_naming_it(tmp_path):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    for read in (lambda: load_state_dict(tmp_path), lambda: load_split(path)):
        with pytest.raises(CheckpointError) as err:
            read()
        assert isinstance(err.value, ModelAlloyError)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_the_bundle_helpers_keep_no_copy_of_the_reader():
    assert not hasattr(bundle_checkpoint, "load_state_dict")
