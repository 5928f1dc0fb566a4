"""Built-in benchmark suites: a tiny base model and task experts trained locally.

``load_suite("tiny-vision", size="smoke")`` builds (or finds in the cache) a suite and returns an
object with ``base_state_dict()``, ``expert_state_dict(task)``, ``evaluate(state_dict)`` and
``info`` (tasks, held-out flags, paths). Suites are cached under ``$MODELALLOY_CACHE`` (default
``~/.cache/modelalloy``) by a hash of their build config and code version (``BUILD_VERSION``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelalloy.bench.common import SuiteError, SuiteInfo, TaskInfo, cache_root

SUITE_NAMES = ("tiny-vision", "tiny-lm")
SIZE_NAMES = ("smoke", "full")


def _suite_class(name: str) -> Any:
    if name == "tiny-vision":
        from modelalloy.bench.vision import VisionSuite

        return VisionSuite
    if name == "tiny-lm":
        from modelalloy.bench.lm import LMSuite

        return LMSuite
    raise SuiteError(f"unknown suite '{name}'; available: {', '.join(SUITE_NAMES)}")


def load_suite(name: str, size: str = "full", *, rebuild: bool = False,
               cache_dir: Path | None = None, log: Callable[[str], None] | None = None,
               overrides: dict[str, Any] | None = None) -> Any:
    """Build or load a cached suite. ``overrides`` changes build-config keys (a new hash)."""
    return _suite_class(name).build(size, rebuild=rebuild, cache_dir=cache_dir, log=log,
                                    overrides=overrides)


__all__ = ["SUITE_NAMES", "SIZE_NAMES", "SuiteError", "SuiteInfo", "TaskInfo", "cache_root",
           "load_suite"]
