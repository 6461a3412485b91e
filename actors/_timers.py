"""Timers armed from the deadlines in transaction state: one heap, one task."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any

import anyio

__all__ = ["Timers"]


class Timers:
    """Calls ``fire(payload)`` at (wall-clock) time ``at`` for each armed timer.

    Run :meth:`run` as a task. Timers are not persisted here: the coordinator re-arms them from
    the deadlines in the state when it loads a transaction.
    """

    def __init__(self, fire: Callable[[Any], None], clock: Callable[[], float] = time.time) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._fire = fire
        self._clock = clock
        self._wake = anyio.Event()

    def arm(self, at: float, payload: Any) -> None:
        """Fire ``payload`` at time ``at``."""
        heap = self._heap
        earliest = heap[0][0] if heap else None
        heapq.heappush(heap, (at, next(self._seq), payload))
        if earliest is None or at < earliest:
            self._wake.set()

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self) -> None:
        """Fire timers as they come due, forever."""
        heap = self._heap
        while True:
            now = self._clock()
            while heap and heap[0][0] <= now:
                _, _, payload = heapq.heappop(heap)
                self._fire(payload)
            self._wake = anyio.Event()
            delay = heap[0][0] - now if heap else None
            with anyio.move_on_after(delay):
                await self._wake.wait()
