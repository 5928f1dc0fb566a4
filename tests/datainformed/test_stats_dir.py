"""A statistics folder of the user's choosing (#19): a `calibration:` recipe over read-only
experts fails in one line naming `--stats-dir`, and with one collects and finds its statistics
there; the recipe key `calibration: {stats_dir: ...}` does the same."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from modelalloy import merge
from modelalloy.stats.store import chosen_path
from tests.conftest import save_gpt2_family
from tests.faults.helpers import assert_one_line, remount_read_only, tmpfs


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    _, experts = save_gpt2_family(root, n_experts=2)
    rows = [{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7]}, {"input_ids": [8, 9, 10]}]
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, experts


def _recipe(path: Path, experts: list[Path], data: Path, **calibration) -> Path:
    path.write_text(yaml.safe_dump({
        "merge_method": "regmean", "models": [{"model": str(e)} for e in experts],
        "parameters": {"alpha": 0.9, "input_dim": "first"},
        "calibration": {"data": str(data), "batch_size": 2, **calibration}}))
    return path


def test_read_only_experts_need_a_statistics_folder(tmp_path, family, run_cli):
    root, experts = family
    # the reference: the same recipe over writable copies, statistics next to each expert
    copies = [Path(shutil.copytree(e, tmp_path / "rw" / e.name)) for e in experts]
    merge(_recipe(tmp_path / "rw.yaml", copies, root / "calib.jsonl"), tmp_path / "expect")
    with tmpfs(tmp_path / "ro", "8m") as mount:
        ro = [Path(shutil.copytree(e, mount / e.name)) for e in experts]
        remount_read_only(mount)
        before = {e.name: _tree_digest(e) for e in ro}
        recipe = _recipe(tmp_path / "r.yaml", ro, root / "calib.jsonl")

        refused = run_cli("merge", recipe, tmp_path / "out")
        assert_one_line(refused, str(ro[0] / "stats"), "not writable", "--stats-dir FOLDER",
                        "calibration")
        assert not (tmp_path / "out").exists()

        folder = tmp_path / "my-stats"
        done = run_cli("merge", recipe, tmp_path / "out", "--stats-dir", folder)
        assert done.code == 0, done.err
        written = [chosen_path(e, "gram", folder) for e in ro]
        assert all(p.is_file() for p in written) and len({p.parent for p in written}) == 2
        assert {e.name: _tree_digest(e) for e in ro} == before  # the experts untouched
        # the same bits as with the statistics next to writable copies
        got, expect = (load_file(str(d / "model.safetensors"))
                       for d in (tmp_path / "out", tmp_path / "expect"))
        assert got.keys() == expect.keys()
        assert all(got[k].equal(expect[k]) for k in got)

        # a second merge finds them there: nothing collected again
        stamps = [os.stat(p).st_mtime_ns for p in written]
        again = run_cli("merge", recipe, tmp_path / "again", "--stats-dir", folder)
        assert again.code == 0, again.err
        assert [os.stat(p).st_mtime_ns for p in written] == stamps


def test_the_recipe_names_its_statistics_folder(tmp_path, family):
    root, experts = family
    recipe = _recipe(tmp_path / "r.yaml", experts, root / "calib.jsonl", stats_dir="stats-here")
    merged = merge(recipe)  # in memory, the recipe's checkpoints
    # relative to the recipe's folder; the experts' own folders get nothing
    assert all(chosen_path(e, "gram", tmp_path / "stats-here").is_file() for e in experts)
    assert not any((e / "stats").exists() for e in experts)
    on_disk = merge(recipe, tmp_path / "out").path
    expect = load_file(str(on_disk / "model.safetensors"))
    assert all(merged[k].equal(expect[k]) for k in expect)
