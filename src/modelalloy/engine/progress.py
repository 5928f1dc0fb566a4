"""A rich progress bar for merges: tensors done, bytes/s, ETA; silent when not wanted."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ProgressSink(Protocol):
    def advance(self, nbytes: int) -> None: ...


class _Silent:
    def advance(self, nbytes: int) -> None:
        pass


class _RichSink:
    def __init__(self, progress: Progress, bytes_task: TaskID, count_task: TaskID):
        self._progress = progress
        self._bytes_task = bytes_task
        self._count_task = count_task

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._bytes_task, nbytes)
        self._progress.advance(self._count_task, 1)


@contextmanager
def merge_progress(label: str, tensors: int, total_bytes: int, enabled: bool,
                   console: Console | None = None) -> Iterator[ProgressSink]:
    """Two lines: tensors done of total, and bytes read with speed and ETA."""
    if not enabled:
        yield _Silent()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=False)
    with progress:
        count_task = progress.add_task(f"{label} tensors", total=tensors)
        bytes_task = progress.add_task(f"{label} bytes read", total=max(total_bytes, 1))
        yield _RichSink(progress, bytes_task, count_task)
