"""Reads of tensors outside the engine (calibration data, optimizer moments, models loaded for
statistics) go through the validated reader: a truncated file or a FIFO is a one-line
CheckpointError naming it, never a hang or the safetensors library's own exception."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelalloy.errors import CheckpointError


def truncated_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    return path


def one_line(err: pytest.ExceptionInfo[CheckpointError], *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def test_calibration_tensors_are_read_through_the_validated_reader(tmp_path):
    from modelalloy.stats.data import tensor_batches

    good = tmp_path / "good.safetensors"
    save_file({"inputs": torch.arange(10.0).reshape(5, 2)}, str(good))
    assert [b.shape[0] for b in tensor_batches(good, batch_size=2)] == [2, 2, 1]
    bad = truncated_safetensors(tmp_path / "calib.safetensors", {"inputs": torch.ones(4, 3)})
    with pytest.raises(CheckpointError) as err:
        tensor_batches(bad)
    one_line(err, str(bad), "truncated")


@pytest.mark.timeout(60)
def test_a_fifo_calibration_pickle_is_refused_without_blocking(tmp_path):
    from modelalloy.stats.data import tensor_batches

    fifo = tmp_path / "calib.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError) as err:
        tensor_batches(fifo)
    one_line(err, f"{fifo}: the PyTorch file is a FIFO")


def test_a_calibration_pickle_must_hold_tensors(tmp_path):
    from modelalloy.stats.data import tensor_batches

    path = tmp_path / "calib.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError) as err:
        tensor_batches(path)
    one_line(err, str(path), "holds a list")
    torch.save(torch.ones(3, 2), path)  # a bare tensor is the inputs
    assert tensor_batches(path, batch_size=2)[1].shape == (1, 2)


def test_truncated_optimizer_moments_are_named(tmp_path):
    from modelalloy.stats.optimizer import load_adam_moments

    path = truncated_safetensors(tmp_path / "optimizer.safetensors",
                                 {"w.exp_avg_sq": torch.ones(3, 2), "w.exp_avg": torch.ones(3, 2)})
    with pytest.raises(CheckpointError) as err:
        load_adam_moments(path)
    one_line(err, str(path))


def test_an_optimizer_pickle_is_read_weights_only(tmp_path):
    from modelalloy.io.checkpoint import load_pickle

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    opt.step()
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    state = load_pickle(path)  # counts and nested dicts, not a flat state dict: still read
    assert torch.equal(state["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])

    class Code:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Code()}, path)
    with pytest.raises(CheckpointError) as err:
        load_pickle(path)
    one_line(err, f"refusing to execute code in pickle {path}")


def test_statistics_name_a_truncated_model_file_before_transformers_loads_it(gpt2_family):
    from modelalloy.stats.pipeline import load_hf_model

    _, (expert, _) = gpt2_family
    weights = expert / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])
    with pytest.raises(CheckpointError) as err:
        load_hf_model(expert)
    one_line(err, str(weights))
