from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.optimize.synthetic import save_family


def write_template(root: Path, method: str = "task_arithmetic", search: dict | None = None,
                   n_experts: int = 2, **top) -> Path:
    base, experts = save_family(root / "models", n_experts)
    data = {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e)} for e in experts],
            "parameters": {"lambda": 1.0, **({"normalize": False}
                                             if method == "task_arithmetic" else {})},
            **top}
    if search is not None:
        data["search"] = search
    path = root / "template.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def template(tmp_path: Path):
    def make(**kwargs):
        kwargs.setdefault("search", {"parameters": {"weight": [0.0, 1.0]}})
        return write_template(tmp_path, **kwargs)
    return make


@pytest.fixture(autouse=True)
def heap_calls(monkeypatch):
    """`modelalloy optimize` sets the process's malloc thresholds (search/heap.py); run
    in-process, that would change the test process for the rest of the suite, so here the
    calls are only counted (tests/optimize/test_heap.py runs the real one in a child)."""
    from modelalloy.search import heap

    calls: list[int] = []
    monkeypatch.setattr(heap, "keep_heap", lambda: calls.append(1) or True)
    return calls
