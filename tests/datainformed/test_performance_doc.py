"""docs/performance.md: the statistics-cost section is written by hand and must survive
benchmarks/merge_speed.py regenerating its own section of the same file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATS_HEADING = "## Statistics collection cost"


def _merge_speed():
    spec = importlib.util.spec_from_file_location("merge_speed_for_doc_test",
                                                  ROOT / "benchmarks" / "merge_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _stats_section(text: str) -> str:
    start = text.index(STATS_HEADING)
    rest = text[start + len(STATS_HEADING):]
    nxt = rest.find("\n## ")
    return text[start:] if nxt < 0 else text[start:start + len(STATS_HEADING) + nxt]


def test_statistics_section_survives_merge_speed_regeneration(tmp_path):
    doc = tmp_path / "performance.md"
    original = (ROOT / "docs" / "performance.md").read_text()
    assert STATS_HEADING in original
    doc.write_text(original)
    ms = _merge_speed()
    ms.write_doc(doc, f"{ms.SECTION}\n\nregenerated body\n")
    new = doc.read_text()
    assert "regenerated body" in new
    assert _stats_section(new) == _stats_section(original)
    assert new.index(ms.SECTION) < new.index(STATS_HEADING)
