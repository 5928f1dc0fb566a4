"""The OUT folder's record of a run: ``trials.jsonl`` (one line per scored candidate, appended
and flushed as each is scored) and ``state.json`` (what the run is, so ``--resume`` can check it
continues the same one).

Resuming replays the algorithm from its seed: every optimizer here is deterministic given its
seed and the scores it was told, so the same candidates come out again and the logged scores are
read back instead of computed; the first candidate past the log is the first new evaluation.
No optimizer object is pickled (a pickle in an output folder would be code to trust).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelalloy.errors import OptimizeError

TRIALS = "trials.jsonl"
STATE = "state.json"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def run_key(config: Mapping[str, Any]) -> str:
    """A hash of what makes a run (algorithm, seed, template, objectives, options)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[
        :16]


class TrialLog:
    """Appends trials to ``<out>/trials.jsonl``; holds those of a resumed run for replay."""

    def __init__(self, out: Path, config: Mapping[str, Any], resume: bool) -> None:
        self.out = out
        self.path = out / TRIALS
        self.config = dict(config)
        self.key = run_key(config)
        self.previous: list[dict[str, Any]] = []
        if self.path.exists() or (out / STATE).exists():
            if not resume:
                raise OptimizeError(f"{out}: holds a previous run ({TRIALS}); pass resume=True "
                                    "to continue it or choose another out=DIR",
                                    options=("resume", "out"))
            self.previous = self._read_previous()
        out.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self.records: list[dict[str, Any]] = []

    def _read_previous(self) -> list[dict[str, Any]]:
        state_path = self.out / STATE
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("key") != self.key:
                changed = [k for k in self.config if state.get("config", {}).get(k) !=
                           json.loads(json.dumps(self.config[k], default=str))]
                raise OptimizeError(f"{self.out}: the previous run differs in "
                                    f"{', '.join(changed) or 'its settings'}; resume=True "
                                    "needs the same algorithm, recipe, objectives, seed and "
                                    "options", options=("resume",))
        records, good_bytes = [], 0
        if self.path.is_file():
            with self.path.open("rb") as f:
                for line in f:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by a kill: dropped, that trial is run again
                    good_bytes += len(line)
            with self.path.open("r+b") as f:
                f.truncate(good_bytes)
        return records

    def replayed(self, index: int) -> dict[str, Any] | None:
        return self.previous[index] if index < len(self.previous) else None

    def append(self, record: dict[str, Any], *, replay: bool = False) -> None:
        self.records.append(record)
        if not replay:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self._file.flush()

    def write_state(self, **extra: Any) -> None:
        write_json_atomic(self.out / STATE, {"key": self.key, "config": self.config,
                                             "trials": len(self.records), **extra})

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def read_trials(out: str | Path) -> list[dict[str, Any]]:
    """The trials of a run folder."""
    path = Path(out) / TRIALS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
