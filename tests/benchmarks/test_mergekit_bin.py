"""benchmarks/mergekit_bin.py: one finder of mergekit-yaml for every script; it finds the venv
where docs/performance.md installs mergekit (../venv-mergekit from the repository root), from a
git worktree too, and says which place it used."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import load_benchmark


def _fake_binary(folder: Path) -> Path:
    path = folder / "mergekit-yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c",
                    "init.defaultBranch=main", *args], cwd=cwd, check=True,
                   capture_output=True, timeout=60)


@pytest.fixture
def layout(tmp_path):
    """<tmp>/main (a git checkout), <tmp>/wt/feature (its worktree), <tmp>/venv-mergekit
    (the docs' venv, made from main's root), an empty PATH folder and home."""
    main = tmp_path / "main"
    main.mkdir()
    _git("init", "-q", cwd=main)
    _git("commit", "-q", "--allow-empty", "-m", "x", cwd=main)
    (tmp_path / "wt").mkdir()
    _git("worktree", "add", "-q", str(tmp_path / "wt" / "feature"), "-b", "feature", cwd=main)
    (tmp_path / "empty").mkdir()
    (tmp_path / "home").mkdir()
    venv_bin = _fake_binary(tmp_path / "venv-mergekit" / "bin")
    env = {"PATH": str(tmp_path / "empty")}
    return main, tmp_path / "wt" / "feature", venv_bin, env, tmp_path / "home"


def test_the_documented_venv_is_found_from_the_checkout_and_from_a_worktree(layout):
    finder = load_benchmark("mergekit_bin")
    main, worktree, venv_bin, env, home = layout
    for repo in (main, worktree):
        path, how = finder.find_mergekit(repo=repo, environ=env, home=home)
        assert path == str(venv_bin)
        assert how == f"found in the venv {venv_bin.parent.parent}"
    assert finder.checkouts(worktree) == [worktree, main.resolve()]
    assert finder.checkouts(main) == [main]


def test_given_path_and_environment_come_first_then_path(layout, tmp_path):
    finder = load_benchmark("mergekit_bin")
    main, _, venv_bin, env, home = layout
    other = _fake_binary(tmp_path / "other")
    assert finder.find_mergekit(str(other), repo=main, environ=env, home=home) == (
        str(other), f"given: --mergekit-bin {other}")
    assert finder.find_mergekit(repo=main, environ={**env, "MERGEKIT_YAML": str(other)},
                                home=home) == (str(other), f"given: MERGEKIT_YAML={other}")
    # a given path that is not an executable is refused, not passed over for the venv
    missing = tmp_path / "nope"
    assert finder.find_mergekit(str(missing), repo=main, environ=env, home=home) == (
        None, f"--mergekit-bin {missing}: not an executable file")
    # an activated venv (PATH) comes before the venvs looked for by name
    assert finder.find_mergekit(repo=main, environ={"PATH": str(other.parent)}, home=home) == (
        str(other), "found on PATH")


def test_nothing_found_names_every_place_looked(tmp_path):
    finder = load_benchmark("mergekit_bin")
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "empty").mkdir()
    path, how = finder.find_mergekit(repo=repo, environ={"PATH": str(tmp_path / "empty")},
                                     home=tmp_path / "home")
    assert path is None
    for place in (tmp_path / "venv-mergekit", repo / ".venv-mergekit",
                  tmp_path / "home" / "venv-mergekit"):
        assert str(place) in how
    assert "MERGEKIT_YAML" in how and "\n" not in how


def test_the_scripts_share_the_one_finder():
    for script in ("merge_speed", "mergekit_recipes"):
        found = load_benchmark(script).find_mergekit
        assert found.__module__ == "mergekit_bin"
        assert Path(found.__code__.co_filename).name == "mergekit_bin.py"
