"""Hostile recipes and model folders through the CLI: one line on stderr, a non-zero exit,
nothing written, and no hang or runaway memory (each case runs under a timeout)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.conftest import save_gpt2_family, write_recipe
from tests.faults.helpers import assert_one_line


def _nothing_written(root: Path, before: set[str]) -> None:
    assert set(os.listdir(root)) == before


@pytest.fixture
def family(tmp_path):
    base, experts = save_gpt2_family(tmp_path, n_experts=1)
    return base, experts[0]


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
merge_method: linear
models: [{model: x, parameters: {weight: *i}}]
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, needle", [
    (BOMB, "alias bomb"),
    ("merge_method: " + "[" * 20000 + "]" * 20000, "nested more than"),
    ("a: &a [*a]\nmerge_method: linear\n", "endless"),
    ("merge_method: linear\n" + "# padding\n" * 500_000, "over the"),
])
def test_malicious_recipes_are_refused(tmp_path, run_cli, text, needle):
    recipe = write_recipe(tmp_path / "r.yaml", text)
    before = set(os.listdir(tmp_path))
    assert_one_line(run_cli("merge", recipe, tmp_path / "out"), str(recipe), needle)
    _nothing_written(tmp_path, before)


def test_recipe_that_is_a_fifo_or_device_is_refused(tmp_path, run_cli):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    assert_one_line(run_cli("merge", fifo, tmp_path / "out"), "FIFO, not a regular file")
    assert_one_line(run_cli("merge", "/dev/zero", tmp_path / "out"), "device, not a regular file")


def test_nul_byte_in_a_model_path(tmp_path, run_cli, family):
    base, _ = family
    recipe = write_recipe(tmp_path / "r.yaml", f'merge_method: linear\nmodels:\n'
                          f'  - model: {base}\n    parameters: {{weight: 1}}\n'
                          f'  - model: "{base}\\0x"\n    parameters: {{weight: 1}}\n')
    before = set(os.listdir(tmp_path))
    assert_one_line(run_cli("merge", recipe, tmp_path / "out"), "NUL byte")
    _nothing_written(tmp_path, before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["devzero", "fifo", "deep"])
def test_hostile_config_json(tmp_path, run_cli, family, kind):
    base, expert = family
    cfg = expert / "config.json"
    cfg.unlink()
    if kind == "devzero":
        cfg.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(cfg)
    else:
        cfg.write_text("[" * 100_000 + "]" * 100_000)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {base}\nmodels:\n  - model: {expert}\n"
                          "    parameters: {weight: 1}\n")
    before = set(os.listdir(tmp_path))
    # a FIFO nobody writes to: the merge must not wait on it (a watchdog opens it for
    # writing only if the merge is still blocked after 30 s, so the test can end)
    guard = threading.Timer(30, lambda: os.open(cfg, os.O_WRONLY | os.O_NONBLOCK)) \
        if kind == "fifo" else None
    needle = {"devzero": "device, not a regular file", "fifo": "FIFO, not a regular file",
              "deep": "nested too deeply"}[kind]
    try:
        assert_one_line(run_cli("merge", recipe, tmp_path / "out"), str(cfg), needle)
    finally:
        if guard is not None:
            guard.cancel()
    _nothing_written(tmp_path, before)


def test_safetensors_header_nested_too_deeply(tmp_path, run_cli, family):
    base, expert = family
    header = ("[" * 50_000 + "]" * 50_000).encode()
    (expert / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {base}\nmodels:\n  - model: {expert}\n"
                          "    parameters: {weight: 1}\n")
    assert_one_line(run_cli("merge", recipe, tmp_path / "out"), "nested too deeply")


def test_config_claiming_more_layers_than_the_tensors_hold(tmp_path, run_cli, family):
    import json

    base, expert = family
    for folder in (base, expert):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["n_layer"] = 5  # the weights hold 3
        (folder / "config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\n"
                          f"base_model: {base}\nmodels:\n  - model: {expert}\n"
                          "    parameters: {weight: 1}\n")
    before = set(os.listdir(tmp_path))
    assert_one_line(run_cli("merge", recipe, tmp_path / "out"), "5 layers", "3")
    _nothing_written(tmp_path, before)


def test_single_file_model_without_config_still_merges(tmp_path, run_cli):
    import torch

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"layers.0.w": torch.full((2, 2), float(i))}, paths[-1])
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: 1}}\n" for p in paths))
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.code == 0, result.err
