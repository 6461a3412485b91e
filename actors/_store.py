"""Where coordinators keep transaction state: live checkpoints and retained finished ones."""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from orchestrator._transaction import TxState

__all__ = ["MemoryStore", "Store"]


class Store(ABC):
    """Checkpoints of live transactions and finished ones kept for their retention."""

    async def open(self) -> None:  # noqa: B027 - a hook with nothing to do by default
        """Prepare the store (create buckets...) once the transport is connected."""

    @abstractmethod
    async def load(self, transaction_id: str) -> TxState | None:
        """The live or retained state of a transaction, or ``None``, for its coordinator, which
        writes it next (a store may remember the revision it read, to compare-and-set)."""

    async def load_start(self, transaction_id: str) -> TxState | None:
        """:meth:`load`, for the coordinator of a transaction being started, which is most
        likely new: a store may leave out what the first :meth:`save` checks anyway (a live
        checkpoint, when saving one that does not exist yet is create-if-absent and a conflict
        raises). Default: :meth:`load`."""
        return await self.load(transaction_id)

    async def read(self, transaction_id: str) -> TxState | None:
        """The live or retained state of a transaction, for anyone but its coordinator (a read
        that must not disturb the coordinator's compare-and-set)."""
        return await self.load(transaction_id)

    @abstractmethod
    async def save(self, state: TxState) -> None:
        """Persist the checkpoint of a live transaction."""

    @abstractmethod
    async def finish(self, state: TxState, retention: float, *, forget: bool = True) -> None:
        """Move a finished transaction to the retained set for ``retention`` seconds.

        ``forget=False``: a store that keeps live checkpoints apart may leave this one behind
        (the retained copy is newer, and wins) until :meth:`forget`, so that a coordinator can
        let the finish out before that second write.
        """

    async def forget(self, transaction_id: str) -> None:  # noqa: B027 - nothing by default
        """Drop the live checkpoint a ``finish(..., forget=False)`` left behind."""

    @abstractmethod
    async def live(self, where: Callable[[str], bool] | None = None) -> list[TxState]:
        """The live (unfinished) transactions whose id passes ``where`` (default: all): what a
        coordinator taking a partition over must resume."""

    @abstractmethod
    async def list(self, workflow: str | None = None) -> list[TxState]:
        """Live and retained transactions (of one workflow)."""


class MemoryStore(Store):
    """The in-memory store of local mode. States are immutable once applied, so it keeps the
    objects themselves, without encoding them."""

    def __init__(self) -> None:
        self._live: dict[str, TxState] = {}
        self._done: dict[str, TxState] = {}
        self._expiry: list[tuple[float, str]] = []
        self._expires_at: dict[str, float] = {}
        self._clock = time.monotonic

    def _expire(self) -> None:
        now = self._clock()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            at, tx = heapq.heappop(expiry)
            if self._expires_at.get(tx) == at:  # not re-finished since
                del self._expires_at[tx]
                self._done.pop(tx, None)

    async def load(self, transaction_id: str) -> TxState | None:
        state = self._live.get(transaction_id)
        if state is not None:
            return state
        if self._expiry and self._expiry[0][0] <= self._clock():
            self._expire()
        return self._done.get(transaction_id)

    async def save(self, state: TxState) -> None:
        self._live[state.transaction_id] = state

    async def finish(self, state: TxState, retention: float, *, forget: bool = True) -> None:
        tx = state.transaction_id
        self._live.pop(tx, None)
        if retention > 0:
            self._done[tx] = state
            at = self._expires_at[tx] = self._clock() + retention
            heapq.heappush(self._expiry, (at, tx))
        else:
            self._done.pop(tx, None)
            self._expires_at.pop(tx, None)
        if len(self._expiry) > 1024 and self._expiry[0][0] <= self._clock():
            self._expire()

    async def live(self, where: Callable[[str], bool] | None = None) -> list[TxState]:
        return [s for tx, s in self._live.items() if where is None or where(tx)]

    async def list(self, workflow: str | None = None) -> list[TxState]:
        self._expire()
        states = list(self._live.values()) + [
            s for tx, s in self._done.items() if tx not in self._live
        ]
        if workflow is not None:
            states = [s for s in states if s.workflow == workflow]
        return states
