"""`modelalloy stats` on a tiny saved GPT-2 (no tokenizer needed: pre-tokenized JSONL)."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from modelalloy.commands import stats as stats_cmd
from modelalloy.stats import StatsReader, collect_grams
from modelalloy.stats.data import load_calibration, read_records


@pytest.fixture
def app():
    app = typer.Typer()

    @app.callback()
    def root() -> None:  # a group, so `stats` is a subcommand as in the real CLI
        pass

    stats_cmd.register(app)
    return app


def test_stats_command_writes_gram_file(tmp_path, tiny_gpt2, app):
    model = tiny_gpt2(0)
    model.save_pretrained(tmp_path / "m")
    rows = [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6]}, {"input_ids": [7, 8, 9]}]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["stats", str(tmp_path / "m"), "--data", str(data),
                                      "--kind", "gram", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    reader = StatsReader(tmp_path / "m" / "stats" / "gram.safetensors")
    key = "transformer.h.1.mlp.c_proj.weight"
    assert reader.kind == "gram" and reader.input_dims[key] == "first"
    # same numbers as the Python collector on the same (padded, masked) batches
    batches = load_calibration(data, batch_size=2)
    expect = collect_grams(model, batches)
    torch.testing.assert_close(reader[key], expect[key])
    assert reader.counts[key] == 9  # padding excluded
    result = CliRunner().invoke(app, ["stats", str(tmp_path / "m"), "--data", str(data),
                                      "--kind", "activations"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "stats" / "activations.safetensors").is_file()


def test_calibration_files(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n\nworld\n")
    assert read_records(tmp_path / "p.txt") == ["hello", "world"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert read_records(tmp_path / "p.jsonl") == ["ab"]
    from safetensors.torch import save_file

    save_file({"inputs": torch.randn(10, 3)}, str(tmp_path / "x.safetensors"))
    batches = load_calibration(tmp_path / "x.safetensors", batch_size=4)
    assert [b.shape[0] for b in batches] == [4, 4, 2]
