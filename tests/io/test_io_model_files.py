"""Config/tokenizer copy, model card, config dtype, dtype names, and an end-to-end HF round trip."""

from __future__ import annotations

import copy
import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from modelalloy.errors import CheckpointError
from modelalloy.io import (
    AtomicOutputDir,
    ShardedSafetensorsWriter,
    copy_model_files,
    dtype_name,
    open_checkpoint,
    parse_dtype,
    set_config_dtype,
    write_model_card,
)

# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float64", torch.float64),
        ("int8", torch.int8),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_unknown_and_names():
    with pytest.raises(ValueError, match="unknown dtype 'bf17'.*bfloat16"):
        parse_dtype("bf17")
    with pytest.raises(ValueError):
        parse_dtype(16)
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(torch.float32) == "float32"
    assert parse_dtype(dtype_name(torch.float16)) is torch.float16


# --------------------------------------------------------------------------- copy


def _fake_model_dir(root, name="src"):
    d = root / name
    d.mkdir()
    files = {
        "config.json": '{"model_type": "gpt2", "torch_dtype": "float32"}',
        "generation_config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "vocab.json": "{}",
        "merges.txt": "",
        "tokenizer.model": "x",
        "added_tokens.json": "{}",
        "chat_template.jinja": "{{ x }}",
        "modeling_evil.py": "import os",
        "tokenization_evil.py": "import os",
        "model.safetensors": "weights",
        "README.md": "card",
        "training_args.bin": "x",
    }
    for k, v in files.items():
        (d / k).write_text(v)
    return d


def test_copy_model_files(tmp_path):
    src = _fake_model_dir(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_model_files(src, dst)
    assert set(copied) == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "added_tokens.json",
        "chat_template.jinja",
    }
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)
    assert not any(n.endswith(".py") for n in copied)


def test_copy_model_files_tokenizer_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text('{"from": "src"}')
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"from": "tok"}')
    (tok / "config.json").write_text('{"from": "tok"}')
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_model_files(src, dst, tokenizer_source=tok) == ["config.json", "tokenizer.json"]
    assert json.loads((dst / "tokenizer.json").read_text()) == {"from": "tok"}
    assert (dst / "config.json").read_text() == "{}"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        copy_model_files(src, dst, tokenizer_source=empty)
    with pytest.raises(CheckpointError, match="not a folder"):
        copy_model_files(src, dst, tokenizer_source=tmp_path / "nope")


def test_copy_model_files_from_weight_file(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_model_files(f, dst) == []


def test_set_config_dtype(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"torch_dtype": "float32", "text_config": {"dtype": "float32"}, "x": 1})
    )
    set_config_dtype(tmp_path, torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == {"torch_dtype": "bfloat16", "text_config": {"dtype": "bfloat16"}, "x": 1}
    (tmp_path / "config.json").write_text('{"dtype": "float32"}')
    set_config_dtype(tmp_path, torch.float16)
    assert json.loads((tmp_path / "config.json").read_text()) == {"dtype": "float16"}
    (tmp_path / "config.json").write_text("{}")
    set_config_dtype(tmp_path, torch.float16)
    assert json.loads((tmp_path / "config.json").read_text()) == {"torch_dtype": "float16"}
    (tmp_path / "config.json").unlink()
    set_config_dtype(tmp_path, torch.float16)  # no config: nothing to do
    assert not (tmp_path / "config.json").exists()


def test_model_card(tmp_path):
    recipe = "merge_method: ties\nmodels:\n  - model: a/b\n# ```not a fence end```\n"
    write_model_card(
        tmp_path,
        recipe_yaml=recipe,
        method="ties",
        base_model="org/base",
        models=["org/a", "org/b"],
        extra_tags=["ties"],
    )
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == ["org/base", "org/a", "org/b"]
    assert front["tags"] == ["merge", "modelalloy", "ties"]
    assert front["library_name"] == "transformers"
    assert "`ties`" in text and "- `org/a`" in text
    # the recipe is reproduced verbatim inside a fence it cannot close
    assert "````yaml\n" + recipe.rstrip("\n") + "\n````" in text


def test_model_card_local_paths_stay_out_of_hub_metadata(tmp_path):
    local = tmp_path / "local-model"
    local.mkdir()
    write_model_card(
        tmp_path,
        recipe_yaml="x: 1",
        method="ties",
        base_model=str(local),
        models=["org/a", "./rel/b"],
    )
    text = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == ["org/a"] and "base_model_relation" not in front
    assert str(local) in text and "./rel/b" in text


def test_model_card_without_base(tmp_path):
    write_model_card(
        tmp_path, recipe_yaml="x: 1", method="linear", base_model=None, models=["o/m1", "o/m2"]
    )
    front = yaml.safe_load((tmp_path / "README.md").read_text().split("---\n")[1])
    assert (
        front["base_model"] == ["o/m1", "o/m2"]
        and "```yaml\nx: 1\n```" in (tmp_path / "README.md").read_text()
    )


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_output_loads_with_transformers(gpt2_dirs, tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    _, sharded, model = gpt2_dirs
    out = tmp_path / "merged"
    with open_checkpoint(sharded) as ck, AtomicOutputDir(out) as atomic:
        tmp = atomic.path
        entries = [(n, ck.info(n).shape, dtype) for n in ck.names()]
        writer = ShardedSafetensorsWriter(tmp, entries, shard_size=30_000)
        names = random.Random(0).sample(ck.names(), len(ck))
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda n: writer.write(n, ck.get(n).to(dtype).contiguous()), names))
        files = writer.close()
        assert len(files) > 2
        copied = copy_model_files(sharded, tmp)
        assert "config.json" in copied
        set_config_dtype(tmp, dtype)
        write_model_card(tmp, recipe_yaml="x: 1", method="linear", base_model=None, models=["a"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == dtype
    ids = torch.tensor([[1, 5, 9, 2, 33]])
    with torch.no_grad():
        got = loaded(ids).logits.float()
        want = copy.deepcopy(model).to(dtype)(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
