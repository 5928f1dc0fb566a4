"""A byte budget shared by the worker threads: the engine knows the bytes in flight."""

from __future__ import annotations

import threading


class ByteBudget:
    """Blocks ``acquire`` until the bytes in flight plus the request fit under ``limit``.

    A request larger than the whole limit is admitted when nothing else is in flight, so one
    huge tensor still merges (alone) instead of dead-locking. ``limit=None`` means unbounded.
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            limit = self.limit
            if limit is not None:
                self._cond.wait_for(lambda: self.in_flight == 0
                                    or self.in_flight + nbytes <= limit)
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_flight -= nbytes
            self._cond.notify_all()
