"""Where ``mergekit-yaml`` is: the one finder of the benchmark scripts that run mergekit.

mergekit is never a modelalloy dependency: docs/performance.md ("How to reproduce") installs it
into its own virtual environment next to the repository (``python3 -m venv ../venv-mergekit``
from the repository root). :func:`find_mergekit` looks, in order, at

1. the path given (a script's ``--mergekit-bin``), then ``$MERGEKIT_YAML``: used or refused,
   never passed over;
2. ``mergekit-yaml`` on ``PATH`` (an activated venv);
3. the documented venv, ``venv-mergekit/bin/mergekit-yaml`` next to this checkout and, when
   this checkout is a git worktree, next to its main checkout too (the docs' command was run
   there once; a worktree sits elsewhere, e.g. ``../wt/NAME``); then ``.venv-mergekit`` inside
   either checkout and ``~/venv-mergekit``;

and says which one it used, or every place it looked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BINARY = "mergekit-yaml"
VENV = "venv-mergekit"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def checkouts(repo: Path = REPO) -> list[Path]:
    """``repo``, then the main checkout when ``repo`` is a git worktree (its ``.git`` is a file
    naming ``<main>/.git/worktrees/<name>``, whose ``commondir`` leads to ``<main>/.git``)."""
    out = [repo]
    dotgit = repo / ".git"
    try:
        text = dotgit.read_text().strip() if dotgit.is_file() else ""
    except OSError:
        return out
    if not text.startswith("gitdir:"):
        return out
    gitdir = (repo / text.removeprefix("gitdir:").strip()).resolve()
    try:
        common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
    except OSError:
        common = gitdir.parent.parent  # <main>/.git/worktrees/<name> -> <main>/.git
    if common.name == ".git" and common.parent != repo:
        out.append(common.parent)
    return out


def venv_candidates(repo: Path = REPO, home: Path | None = None) -> list[Path]:
    """The venvs looked in, in order (see the module's docstring)."""
    places = checkouts(repo)
    venvs = [c.parent / VENV for c in places] + [c / f".{VENV}" for c in places]
    venvs.append((home if home is not None else Path.home()) / VENV)
    return list(dict.fromkeys(venvs))


def find_mergekit(explicit: str | None = None, *, repo: Path = REPO,
                  environ: Mapping[str, str] | None = None,
                  home: Path | None = None) -> tuple[str | None, str]:
    """(path to mergekit-yaml or None, which place it came from / where it was looked for)."""
    env = os.environ if environ is None else environ
    given = explicit or env.get("MERGEKIT_YAML")
    if given:
        source = f"--mergekit-bin {given}" if explicit else f"MERGEKIT_YAML={given}"
        found = shutil.which(given, path=env.get("PATH")) or given
        if _executable(Path(found)):
            return str(found), f"given: {source}"
        return None, f"{source}: not an executable file"
    on_path = shutil.which(BINARY, path=env.get("PATH"))
    if on_path:
        return on_path, "found on PATH"
    venvs = venv_candidates(repo, home)
    for venv in venvs:
        binary = venv / "bin" / BINARY
        if _executable(binary):
            return str(binary), f"found in the venv {venv}"
    looked = ", ".join(str(v) for v in venvs)
    return None, (f"{BINARY} not found (not on PATH, no MERGEKIT_YAML, not in {looked}); install "
                  f"mergekit into its own venv (docs/performance.md, 'How to reproduce') or "
                  f"pass --mergekit-bin / set MERGEKIT_YAML")
