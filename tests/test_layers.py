"""Layers point down and no modules import each other in a circle (docs/architecture.md).

The layer order is the import-linter contract in pyproject.toml, beside a second one that keeps
the methods' private helpers (methods/_*.py) to the methods package; this test runs them, so a
new import that points up or into a method's internals fails the suite, not only a linter
someone may forget to run.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Circles that remain, each with why; the test fails when one disappears, so the list shrinks.
KNOWN_CYCLES: set[tuple[str, str]] = set()


def test_layers_point_down(monkeypatch):
    import importlinter.cli as importlinter
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src") + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
    code = importlinter.lint_imports(config_filename=str(ROOT / "pyproject.toml"),
                                     no_cache=True, no_logo=True)
    assert code == 0, ("an import points up a layer or into methods/_*.py: run `lint-imports` "
                       "for the chain")


def test_no_import_circles():
    import grimp
    graph = grimp.build_graph("modelalloy")
    cycles = {tuple(sorted((module, dep)))
              for module in graph.modules
              for dep in graph.find_modules_directly_imported_by(module)
              if graph.chain_exists(importer=dep, imported=module)}
    assert cycles - KNOWN_CYCLES == set(), f"new import circles: {sorted(cycles - KNOWN_CYCLES)}"
    assert KNOWN_CYCLES - cycles == set(), (
        f"circles gone (remove them from KNOWN_CYCLES): {sorted(KNOWN_CYCLES - cycles)}")
