"""The memory transport's clockwork: one task runs every deadline, and busy callers yield."""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import NoReturn

import anyio
import anyio.lowlevel

logger = logging.getLogger("transport")

YIELD_EVERY = 64
"""Operations between two forced checkpoints (see ``Scheduler.tick``)."""


class Scheduler:
    """Deadlines in one heap, served by one task (``run``) that sleeps until the earliest.

    Callbacks are synchronous and run in that task; one that raises is logged. Cancelling a
    deadline is the callback's business: it checks, when called, whether it is still wanted, so
    scheduling stays one heap push.
    """

    __slots__ = ("_counter", "_heap", "_ops", "_wake")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._wake: anyio.Event | None = None  # made by run(): no event loop may exist yet
        self._ops = 0

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` once ``time.monotonic()`` has reached ``when``."""
        entry = (when, next(self._counter), callback)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry and self._wake is not None:
            self._wake.set()

    async def tick(self) -> None:
        """Count an operation; every ``YIELD_EVERY`` of them, yield to the event loop.

        The memory transport completes its operations without waiting, so a loop that only
        publishes would otherwise never let another task run.
        """
        self._ops += 1
        if not self._ops % YIELD_EVERY:
            await anyio.lowlevel.checkpoint()

    async def run(self) -> NoReturn:
        """Serve deadlines until cancelled."""
        heap = self._heap
        while True:
            # A deadline added from here on, if earliest, sets this event and so wakes us.
            self._wake = wake = anyio.Event()
            if not heap:
                await wake.wait()
            else:
                delay = heap[0][0] - time.monotonic()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await wake.wait()
                else:
                    await anyio.lowlevel.checkpoint()
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                callback = heapq.heappop(heap)[2]
                try:
                    callback()
                except Exception:
                    logger.exception("transport timer callback %r failed", callback)
