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


def test_stats_command_subsamples_tokens_for_grams(tmp_path, tiny_gpt2, app):
    model = tiny_gpt2(0)
    model.save_pretrained(tmp_path / "m")
    rows = [{"input_ids": list(range(1 + i, 9 + i))} for i in range(12)]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["stats", str(tmp_path / "m"), "--data", str(data),
                                      "--kind", "gram", "--gram-token-fraction", "0.5",
                                      "--seed", "3"])
    assert result.exit_code == 0, result.output
    reader = StatsReader(tmp_path / "m" / "stats" / "gram.safetensors")
    key = "transformer.h.0.mlp.c_fc.weight"
    expect = collect_grams(model, load_calibration(data, batch_size=8), token_fraction=0.5,
                           seed=3)
    torch.testing.assert_close(reader[key], expect[key])
    exact = collect_grams(model, load_calibration(data, batch_size=8))
    assert not torch.allclose(reader[key], exact[key])
    bad = CliRunner().invoke(app, ["stats", str(tmp_path / "m"), "--data", str(data),
                                   "--kind", "gram", "--gram-token-fraction", "0"])
    assert bad.exit_code != 0 and "--gram-token-fraction must be in (0, 1]" in str(bad.exception)


def test_calibration_files(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n\nworld\n")
    assert read_records(tmp_path / "p.txt") == ["hello", "world"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert read_records(tmp_path / "p.jsonl") == ["ab"]
    from safetensors.torch import save_file

    save_file({"inputs": torch.randn(10, 3)}, str(tmp_path / "x.safetensors"))
    batches = load_calibration(tmp_path / "x.safetensors", batch_size=4)
    assert [b.shape[0] for b in batches] == [4, 4, 2]


def _adam_folder(path, model, steps=2, seed=0):
    """Save ``model`` after a few Adam steps, with its optimizer state the way the benchmark
    suites do (``optimizer.safetensors``: ``<name>.exp_avg``, ``.exp_avg_sq``, ``.step``)."""
    from safetensors.torch import save_file

    from modelalloy.bench.common import adam_state_tensors

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 50, (2, 6))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(path)
    names = {id(p): n for n, p in model.named_parameters()}
    save_file(adam_state_tensors(opt, names), str(path / "optimizer.safetensors"))
    return {n: opt.state[p]["exp_avg_sq"].clone() for n, p in model.named_parameters()}


def test_stats_exp_avg_sq_from_the_saved_optimizer_state(tmp_path, tiny_gpt2, app):
    from safetensors.torch import load_file

    from modelalloy.methods.ota import rank1_second_moment

    model = tiny_gpt2(0)
    expect = _adam_folder(tmp_path / "m", model)
    res = CliRunner().invoke(app, ["stats", str(tmp_path / "m"), "--kind", "exp_avg_sq"])
    assert res.exit_code == 0, res.output
    reader = StatsReader(tmp_path / "m" / "stats" / "exp_avg_sq.safetensors")
    assert reader.kind == "exp_avg_sq"
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(reader) <= set(weights) and len(reader) > 0  # no .exp_avg / .step entries
    for name in reader:
        torch.testing.assert_close(reader[name], expect[name])
    # the compressed variant: same kind and place, the rank-1 reconstruction of each matrix
    out = tmp_path / "v1.safetensors"
    res = CliRunner().invoke(app, ["stats", str(tmp_path / "m"), "--kind", "exp_avg_sq",
                                   "--compress", "rank1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r1 = StatsReader(out)
    assert r1.metadata["compress"] == "rank1"
    key = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(r1[key], rank1_second_moment(expect[key]))


def test_ota_recipe_finds_the_written_moments(tmp_path, tiny_gpt2, app):
    import yaml

    from modelalloy import merge, merge_state_dicts
    from modelalloy.stats import load_stats

    tiny_gpt2(0).save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in tiny_gpt2(0).state_dict().items()}
    sds, paths = [], []
    for s in (1, 2):
        m = tiny_gpt2(0)
        _adam_folder(tmp_path / f"e{s}", m, steps=3, seed=s)
        sds.append({k: v.clone() for k, v in m.state_dict().items()})
        paths.append(tmp_path / f"e{s}")
        if s == 1:  # the other expert's moments are written by `merge` itself
            res = CliRunner().invoke(app, ["stats", str(paths[-1]), "--kind", "exp_avg_sq"])
            assert res.exit_code == 0, res.output
    assert not (paths[1] / "stats" / "exp_avg_sq.safetensors").exists()
    recipe = {"merge_method": "ota", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(p)} for p in paths], "parameters": {"epsilon": 1e-30}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    merge(tmp_path / "r.yaml", tmp_path / "out")
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    moments = [load_stats(p, "exp_avg_sq") for p in paths]
    expect = merge_state_dicts("ota", base, sds, stats={"exp_avg_sq": moments}, epsilon=1e-30)
    key = "transformer.h.1.attn.c_attn.weight"
    torch.testing.assert_close(got[key].float(), expect[key].float(), rtol=1e-5, atol=1e-6)


def test_stats_exp_avg_sq_without_optimizer_state_is_a_one_line_error(tmp_path, tiny_gpt2):
    import subprocess
    import sys

    tiny_gpt2(0).save_pretrained(tmp_path / "m")
    proc = subprocess.run([sys.executable, "-m", "modelalloy", "stats", str(tmp_path / "m"),
                           "--kind", "exp_avg_sq"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "no optimizer state" in lines[0]
    assert "Traceback" not in proc.stderr
