"""The type checker on the core layers (the files and the not-yet-clean list are mypy's
configuration in pyproject.toml): a new module there, or a clean one, must check clean."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_layers_type_check(monkeypatch):
    from mypy import api

    monkeypatch.chdir(ROOT)
    stdout, stderr, code = api.run(["--config-file", str(ROOT / "pyproject.toml"),
                                    "--cache-dir", os.devnull, "--no-error-summary"])
    assert code == 0, stdout + stderr
