"""Guards for a fresh install: test folders never shadow installed distributions, and every
module the package imports is declared in pyproject (core or an extra)."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_folder_is_a_package():
    """A folder without __init__.py is imported by its bare name (pytest's rootdir-less
    'prepend' mode), so tests/kernels once shadowed the `kernels` distribution that
    transformers imports. As packages, they are only reachable as `tests.<name>`."""
    folders = [d for d in (ROOT / "tests").rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))]
    missing = [str(d.relative_to(ROOT)) for d in [ROOT / "tests", *folders]
               if not (d / "__init__.py").exists()]
    assert not missing, f"test folders without __init__.py: {missing}"


def test_installed_kernels_is_not_ours():
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("the `kernels` distribution is not installed")
    assert ROOT / "tests" not in Path(spec.origin or "").parents


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level module -> first file importing it, over src/modelalloy (absolute imports)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "src" / "modelalloy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     and node.module else [])
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_module_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {_normalise(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in requirements}
    providers = metadata.packages_distributions()
    undeclared = {}
    for module, where in _imported_top_level_modules().items():
        if module == "modelalloy" or module in sys.stdlib_module_names or module == "__future__":
            continue
        distributions = {_normalise(d) for d in providers.get(module, [])}
        if not distributions:
            undeclared[module] = f"{where} (not installed here)"
        elif not distributions & declared:
            undeclared[module] = where
    assert not undeclared, f"imported but not declared in pyproject: {undeclared}"
