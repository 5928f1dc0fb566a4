"""`modelalloy bench --seeds N` runs on every seed the methods a plain `modelalloy bench` runs:
every registered method without --methods, the named ones with it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """The CLI with the suite builds and merges replaced by a recorder of the methods asked."""
    import modelalloy.bench as bench
    import modelalloy.eval.harness as harness
    import modelalloy.eval.report as report

    calls: list[tuple[str, list[str]]] = []

    def load_suite(name, size, **kw):
        seed = (kw.get("overrides") or {}).get("finetune_seed", 0)
        return SimpleNamespace(info=SimpleNamespace(path=tmp_path / f"suite-{seed}"), seed=seed)

    def run_bench(suite, methods, **kw):
        calls.append((f"seed {suite.seed}", [m.name for m in harness.resolve_methods(methods)]))
        return harness.BenchResult("tiny-vision", "smoke", [], {}, {}, {})

    def write_results(result, out):
        Path(out).mkdir(parents=True, exist_ok=True)
        return {k: Path(out) / f"results.{k}" for k in ("md", "json", "png")}

    monkeypatch.setattr(bench, "load_suite", load_suite)
    monkeypatch.setattr(harness, "run_bench", run_bench)
    monkeypatch.setattr(report, "write_results", write_results)
    monkeypatch.setattr(report, "print_table", lambda *a, **k: None)
    return calls


@pytest.mark.parametrize("methods", [[], ["--methods", "ties,linear"]], ids=["default", "named"])
def test_every_seed_runs_the_plain_bench_methods(recorded, run_cli, tmp_path, methods):
    from modelalloy.methods import list_methods

    args = ["bench", "--size", "smoke", "--quiet", *methods]
    assert run_cli(*args, "--out", tmp_path / "plain").code == 0
    (plain,) = recorded
    expected = [m.name for m in list_methods()] if not methods else ["ties", "linear"]
    assert plain == ("seed 0", expected)
    recorded.clear()
    assert run_cli(*args, "--seeds", "3", "--out", tmp_path / "seeds").code == 0
    assert recorded == [(f"seed {s}", expected) for s in range(3)]
    assert (tmp_path / "seeds" / "seeds.md").is_file()


def test_the_seeds_help_says_which_methods_run(run_cli):
    out = " ".join(run_cli("bench", "--help").out.replace("│", " ").split())
    assert "every registered method unless --methods names some" in out
