"""Every bad input: a one-line error naming what and where, exit 1, no output folder."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import write_recipe


def models_yaml(paths: list[Path]) -> str:
    return "".join(f"  - model: {p}\n" for p in paths)


def ta_recipe(tmp_path: Path, base: Path, experts: list[Path], extra: str = "") -> Path:
    return write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {base}"
                        f"\n{extra}models:\n{models_yaml(experts)}")


def assert_clean_failure(result, out: Path, *needles: str) -> None:
    assert result.code != 0
    assert "Traceback" not in result.err
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle in result.err, (needle, result.err)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp*")), "temporary folder left behind"


def rewrite_safetensors(path: Path, mutate) -> None:
    """Rewrite a safetensors file's header through ``mutate(header_dict)``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def first_weight(folder: Path) -> tuple[Path, str]:
    f = folder / "model.safetensors"
    name = next(k for k, v in load_file(f).items() if v.ndim == 2)
    return f, name


def test_missing_model_folder(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    recipe = ta_recipe(tmp_path, base, [experts[0], tmp_path / "nope"])
    out = tmp_path / "out"
    assert_clean_failure(run_cli("merge", recipe, out), out, "nope")


def test_empty_model_folder(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    recipe = ta_recipe(tmp_path, base, [experts[0], tmp_path / "empty"])
    assert_clean_failure(run_cli("merge", recipe, out), out, "empty")


def test_invalid_config_json(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    (experts[1] / "config.json").write_text("{not json")
    out = tmp_path / "out"
    assert_clean_failure(run_cli("merge", ta_recipe(tmp_path, base, experts), out), out,
                         "config.json")


@pytest.mark.parametrize("damage", ["truncated", "bad_header", "offset_past_end", "overlap",
                                    "unknown_dtype"])
def test_corrupt_safetensors(gpt2_family, tmp_path, run_cli, damage):
    base, experts = gpt2_family
    f, name = first_weight(experts[1])
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:-1000])
    elif damage == "bad_header":
        raw = f.read_bytes()
        f.write_bytes(raw[:8] + b"{" * 20 + raw[28:])
    elif damage == "offset_past_end":
        def past_end(h):
            s, e = h[name]["data_offsets"]
            h[name]["data_offsets"] = [s + 10**9, e + 10**9]
        rewrite_safetensors(f, past_end)
    elif damage == "overlap":
        def overlap(h):
            keys = [k for k in h if k != "__metadata__"]
            other = next(k for k in keys if k != name and h[k]["dtype"] == h[name]["dtype"]
                         and h[k]["shape"] == h[name]["shape"])
            h[other]["data_offsets"] = h[name]["data_offsets"]
        rewrite_safetensors(f, overlap)
    else:
        rewrite_safetensors(f, lambda h: h[name].update(dtype="F13"))
    out = tmp_path / "out"
    result = run_cli("merge", ta_recipe(tmp_path, base, experts), out)
    assert_clean_failure(result, out, "model.safetensors")


def sharded(tmp_path: Path) -> tuple[Path, list[Path]]:
    from tests.conftest import save_gpt2_family

    return save_gpt2_family(tmp_path / "sh", max_shard_size="40KB")


@pytest.mark.parametrize("damage", ["outside", "missing_shard", "not_in_shard"])
def test_bad_shard_index(tmp_path, run_cli, damage):
    base, experts = sharded(tmp_path)
    index_path = experts[0] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    if damage == "outside":
        shutil.copy(experts[0] / index["weight_map"][name], tmp_path / "evil.safetensors")
        index["weight_map"][name] = "../../evil.safetensors"
    elif damage == "missing_shard":
        (experts[0] / index["weight_map"][name]).unlink()
    else:
        shards = sorted(set(index["weight_map"].values()))
        index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    result = run_cli("merge", ta_recipe(tmp_path, base, experts), out)
    assert_clean_failure(result, out, str(experts[0].name))


def test_missing_and_extra_tensors(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    f = experts[1] / "model.safetensors"
    tensors = load_file(f)
    name = next(iter(tensors))
    tensors["extra.weight"] = tensors.pop(name)
    save_file(tensors, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    result = run_cli("merge", ta_recipe(tmp_path, base, experts), out)
    assert_clean_failure(result, out, "missing")
    assert result.code != 0


def test_shape_mismatch(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    f, name = first_weight(experts[1])
    tensors = load_file(f)
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_clean_failure(run_cli("merge", ta_recipe(tmp_path, base, experts), out), out,
                         name, "shape")


def test_architecture_mismatch(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    cfg = json.loads((experts[1] / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (experts[1] / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_clean_failure(run_cli("merge", ta_recipe(tmp_path, base, experts), out), out,
                         "architecture")


def test_nonfinite_input_fails_or_warns(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    f, name = first_weight(experts[1])
    tensors = load_file(f)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    recipe = ta_recipe(tmp_path, base, experts)
    assert_clean_failure(run_cli("merge", recipe, out), out, name, "NaN")
    allowed = run_cli("merge", recipe, out, "--allow-nonfinite")
    assert allowed.code == 0 and "warning" in allowed.err and name in allowed.err


@pytest.mark.parametrize("recipe_text, needle", [
    ("merge_method: frobnicate\nbase_model: {base}\nmodels:\n{models}", "frobnicate"),
    ("merge_method: ties\nbase_model: {base}\nparameters: {{density: 1.5}}\nmodels:\n{models}",
     "density"),
    ("merge_method: slerp\nparameters: {{t: -0.1}}\nbase_model: {base}\nmodels:\n{one}", "t"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n"
     "  - model: {e0}\n    parameters: {{weight: -1}}\nconventions: paper\n", "weight"),
    ("merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: .nan}}\n"
     "models:\n{models}", "lambda"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels:\n{one}", "model_stock"),
    ("merge_method: ties\nmodels:\n{models}", "base"),
])
def test_bad_recipes(gpt2_family, tmp_path, run_cli, recipe_text, needle):
    base, experts = gpt2_family
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text.format(
        base=base, models=models_yaml(experts), one=models_yaml(experts[:1]), e0=experts[0]))
    out = tmp_path / "out"
    assert_clean_failure(run_cli("merge", recipe, out), out, needle)


def test_output_path_problems(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    recipe = ta_recipe(tmp_path, base, experts)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = run_cli("merge", recipe, a_file)
    assert result.code != 0 and "Traceback" not in result.err and a_file.read_text() == "x"
    result = run_cli("merge", recipe, experts[0])
    assert result.code != 0 and "Traceback" not in result.err
    assert (experts[0] / "model.safetensors").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    result = run_cli("merge", recipe, existing)
    assert result.code != 0 and "--force" in result.err and (existing / "keep.txt").exists()
    forced = run_cli("merge", recipe, existing, "--force")
    assert forced.code == 0 and not (existing / "keep.txt").exists()


def test_unwritable_output_parent(gpt2_family, tmp_path, run_cli):
    # /proc refuses new folders even to root, so this holds in CI (which runs as root).
    base, experts = gpt2_family
    out = Path("/proc/modelalloy-cannot-write-here")
    result = run_cli("merge", ta_recipe(tmp_path, base, experts), out)
    assert result.code != 0 and "Traceback" not in result.err and str(out) in result.err
    assert len(result.err.strip().splitlines()) == 1


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED_MARKER', 'w').write('x')",))


def test_pickle_that_runs_code_is_refused(gpt2_family, tmp_path, run_cli, monkeypatch):
    base, experts = gpt2_family
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.bin"
    with evil.open("wb") as fh:
        pickle.dump({"w": torch.zeros(2), "x": _Evil()}, fh)
    out = tmp_path / "out"
    recipe = ta_recipe(tmp_path, base, [experts[0], evil])
    result = run_cli("merge", recipe, out)
    assert_clean_failure(result, out, "evil.bin")
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_debug_shows_traceback(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    recipe = ta_recipe(tmp_path, base, [experts[0], tmp_path / "nope"])
    result = run_cli("--debug", "merge", recipe, tmp_path / "out")
    assert result.code != 0 and "Traceback" in result.err


@pytest.mark.parametrize("option", ["--shard-size", "--memory-budget"])
def test_bad_size_option(gpt2_family, tmp_path, run_cli, option):
    base, experts = gpt2_family
    out = tmp_path / "out"
    result = run_cli("merge", ta_recipe(tmp_path, base, experts), out, option, "lots")
    assert_clean_failure(result, out, option)


def test_memory_budget_too_small_for_the_largest_tensor(gpt2_family, tmp_path, run_cli):
    base, experts = gpt2_family
    out = tmp_path / "out"
    result = run_cli("merge", ta_recipe(tmp_path, base, experts), out, "--memory-budget",
                     "10MB")
    assert_clean_failure(result, out, "--memory-budget", "too small", "use at least")
