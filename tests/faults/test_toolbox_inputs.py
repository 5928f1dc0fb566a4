"""Bad input to extract-lora, merge-adapters, merge-stream, moe and merge-multi: one line on
stderr, a non-zero exit, nothing written; a FIFO or an alias bomb as a recipe is refused
without reading it to the end."""

from __future__ import annotations

import os

import pytest

from tests.conftest import save_gpt2_family, write_recipe
from tests.faults.helpers import assert_one_line

BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9) if p else ', '.join(['x'] * 9)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e"], "abcdef", strict=True))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_gpt2_family(tmp_path_factory.mktemp("family"), n_experts=2)


def _outputs(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(tmp_path) if n not in ("fifo", "r.yaml"))


@pytest.mark.parametrize("args, needles", [
    (["--rank", "2", "--include", "("], ["--include '('", "not a regular expression"]),
    (["--rank", "2", "--exclude", "[a-"], ["--exclude '[a-'", "not a regular expression"]),
    (["--rank", "2", "--device", "tpu"], ["--device tpu", "cpu, cuda"]),
    (["--rank", "2", "--dtype", "int8"], ["--dtype int8", "floating point"]),
    (["--rank", "2", "--svd-driver", "gesvdj"], ["gesdd", "CUDA"]),
    (["--rank", "2", "--svd-clamp", "0"], ["--svd-clamp 0.0", "(0, 1]"]),
])
def test_extract_lora_bad_options(tmp_path, run_cli, family, args, needles):
    base, (expert, _) = family
    assert_one_line(run_cli("extract-lora", expert, "--base", base, "--out", tmp_path / "ad",
                            *args), *needles)
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("args, needles", [
    (["--exclude", "("], ["--exclude '('", "not a regular expression"]),
    (["--device", "tpu"], ["--device tpu", "cpu, cuda"]),
])
def test_merge_stream_bad_options(tmp_path, run_cli, family, args, needles):
    base, experts = family
    assert_one_line(run_cli("merge-stream", base, *experts, "--out", tmp_path / "m", *args),
                    *needles)
    assert _outputs(tmp_path) == []


def test_merge_adapters_bad_device(tmp_path, run_cli):
    assert_one_line(run_cli("merge-adapters", tmp_path / "a", tmp_path / "b", "--combination",
                            "svd", "--device", "cuda:x", "--out", tmp_path / "m"),
                    "--device cuda:x")
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("command", [["moe"], ["merge-multi", "-I", "work"]])
@pytest.mark.parametrize("hostile", ["fifo", "bomb"])
def test_moe_and_multistage_recipes_are_read_with_limits(tmp_path, run_cli, command, hostile):
    """A FIFO recipe used to hang both commands; an alias bomb was expanded unchecked."""
    recipe = tmp_path / "r.yaml"
    if hostile == "fifo":
        os.mkfifo(recipe)
        needle = "not a regular file"
    else:
        write_recipe(recipe, BOMB)
        needle = "alias bomb"
    args = [a if a != "work" else tmp_path / "work" for a in command[1:]]
    assert_one_line(run_cli(command[0], recipe, *args, "--out" if command[0] == "moe"
                            else "--out-path", tmp_path / "out"), needle)
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("size, needle", [("abc", "invalid size"), ("0", "positive")])
def test_moe_bad_shard_size_before_any_work(tmp_path, run_cli, size, needle):
    recipe = write_recipe(tmp_path / "r.yaml", "base_model: nowhere\nexperts: []\n")
    assert_one_line(run_cli("moe", recipe, "--out", tmp_path / "out", "--shard-size", size),
                    "--shard-size", needle)
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("work, args, needle", [
    ("file", [], "cannot create the work folder"),
    ("work", ["--threads", "0"], "--threads 0: must be at least 1"),
])
def test_merge_multi_bad_work_folder_and_threads(tmp_path, run_cli, family, work, args,
                                                 needle):
    base, experts = family
    recipe = write_recipe(tmp_path / "r.yaml", "name: soup\nmerge_method: linear\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    (tmp_path / "file").write_text("in the way")
    assert_one_line(run_cli("merge-multi", recipe, "-I", tmp_path / work, *args), needle)
    assert _outputs(tmp_path) == ["file"]


@pytest.mark.parametrize("args, needle", [
    (["--density", "2"], "--density 2.0: must be in (0, 1]"),
    (["--density", "nan"], "--density nan: must be in (0, 1]"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
])
def test_inspect_bad_options(tmp_path, run_cli, family, args, needle):
    """Accepted before (exit 0): the recipe's own density hid a nonsensical --density."""
    base, experts = family
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: ties\nbase_model: {base}\n"
                          "parameters: {density: 0.5}\nmodels:\n"
                          + "".join(f"  - model: {e}\n" for e in experts))
    assert_one_line(run_cli("inspect", recipe, "--out", tmp_path / "out", *args), needle)
    assert _outputs(tmp_path) == []


def test_extract_lora_of_a_model_from_itself_is_refused(tmp_path, run_cli, family):
    """Δ = 0 everywhere: wrote an adapter of zero factors at the rank asked (exit 0)."""
    base, _ = family
    assert_one_line(run_cli("extract-lora", base, "--base", base, "--rank", "2", "--out",
                            tmp_path / "ad"), "nothing to extract")
    assert _outputs(tmp_path) == []


@pytest.fixture
def adapters(tmp_path):
    pytest.importorskip("peft")
    from tests.lora.helpers import peft_adapter, tiny_llama

    for name, seed in (("a1", 1), ("a2", 2)):
        peft_adapter(tiny_llama(), tmp_path / name, seed=seed, r=2, lora_alpha=4,
                     target_modules=["q_proj"])
    return tmp_path / "a1", tmp_path / "a2"


@pytest.mark.parametrize("hostile, needle", [
    ("fifo", "is a FIFO, not a regular file"),
    ("device", "is a device, not a regular file"),
    ("huge", "over the 16.0 MiB"),
    ("nan rank", "r is 'NaN', not an integer ≥ 1"),
    ("inf alpha", "lora_alpha is inf, not a finite number"),
    ("rank pattern", "rank_pattern['q_proj'] is 0.5, not an integer ≥ 1"),
])
def test_merge_adapters_refuses_a_hostile_adapter_config(tmp_path, run_cli, adapters, hostile,
                                                        needle):
    """A FIFO config hung the command, /dev/zero was read until the kernel killed it, a rank of
    'NaN' ended in a ValueError traceback."""
    import json

    a1, a2 = adapters
    cfg = a2 / "adapter_config.json"
    config = json.loads(cfg.read_text())
    cfg.unlink()
    if hostile == "fifo":
        os.mkfifo(cfg)
    elif hostile == "device":
        cfg.symlink_to("/dev/zero")
    elif hostile == "huge":
        cfg.write_text(json.dumps({**config, "pad": "x" * (17 << 20)}))
    else:
        key, value = {"nan rank": ("r", "NaN"), "inf alpha": ("lora_alpha", float("inf")),
                      "rank pattern": ("rank_pattern", {"q_proj": 0.5})}[hostile]
        cfg.write_text(json.dumps({**config, key: value}))
    assert_one_line(run_cli("merge-adapters", a1, a2, "--out", tmp_path / "m"), needle)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, needle", [
    (["--combination", "ties", "--density", "nan"], "--density nan: must be in (0, 1]"),
    (["--combination", "svd", "--svd-rank", "0"], "--svd-rank 0: must be at least 1"),
    (["--combination", "linear", "WEIGHT"], "weights must be finite"),
])
def test_merge_adapters_bad_numbers(tmp_path, run_cli, adapters, args, needle):
    """Each ended in a traceback or wrote an adapter (exit 0)."""
    a1, a2 = adapters
    args = [f"{a2}:nan" if a == "WEIGHT" else a for a in args]
    inputs = [a1] if f"{a2}:nan" in args else [a1, a2]
    assert_one_line(run_cli("merge-adapters", *inputs, *args, "--out", tmp_path / "m"), needle)
    assert not (tmp_path / "m").exists()
