"""A :class:`Store` on the transport's key-value buckets (``orch_tx`` and ``orch_done``).

Live checkpoints go to ``<prefix>_tx`` with compare-and-set on the revision the coordinator last
wrote, so two writers of one transaction cannot silently overwrite each other; finished ones move
to ``<prefix>_done`` with a per-key ttl (the retention).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import anyio
import msgspec

from orchestrator._transaction import TxState
from transport import Entry, KeyExistsError, KeyValue, RevisionMismatchError, Transport

from ._store import Store

__all__ = ["KvStore", "StoreConflictError", "kv_key", "transaction_id_of"]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TxState)
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_ESCAPE = re.compile(r"(?:=[0-9A-F]{2})+")


class StoreConflictError(Exception):
    """Someone else wrote this transaction's checkpoint since we read it: reload and retry."""


def kv_key(transaction_id: str) -> str:
    """A transaction id as a bucket key (``=XX`` escapes for what keys may not hold)."""
    if _UNSAFE.search(transaction_id) is None:
        return transaction_id
    return _UNSAFE.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), transaction_id)


def transaction_id_of(key: str) -> str:
    """The transaction id a bucket key stands for (the inverse of :func:`kv_key`)."""
    if "=" not in key:
        return key
    return _ESCAPE.sub(lambda m: bytes.fromhex(m.group().replace("=", "")).decode(), key)


def _newest(done: Entry | None, live: Entry | None) -> TxState | None:
    # The newer wins: a finished copy over a checkpoint a finish cut short left behind, a
    # checkpoint of a finished transaction being compensated (a cancel) over its old copy.
    states = [_decoder.decode(e.value) for e in (done, live) if e is not None]
    return max(states, key=lambda state: state.version, default=None)


class KvStore(Store):
    """Checkpoints in key-value buckets; call :meth:`open` once before use."""

    def __init__(self, transport: Transport, *, prefix: str = "orch", replicas: int = 1) -> None:
        """``replicas``: copies a NATS cluster keeps of each bucket, when it is created."""
        self.transport = transport
        self.replicas = replicas
        self.prefix = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)
        self._live: KeyValue | None = None
        self._done: KeyValue | None = None
        self._revisions: dict[str, int] = {}

    async def open(self) -> None:
        """Create (or bind) the buckets."""
        self._live = await self.transport.open_kv(f"{self.prefix}_tx", replicas=self.replicas)
        self._done = await self.transport.open_kv(f"{self.prefix}_done", replicas=self.replicas)

    @property
    def live_bucket(self) -> KeyValue:
        if self._live is None:
            raise RuntimeError("KvStore.open() was not called")
        return self._live

    @property
    def done(self) -> KeyValue:
        if self._done is None:
            raise RuntimeError("KvStore.open() was not called")
        return self._done

    async def load(self, transaction_id: str) -> TxState | None:
        key = kv_key(transaction_id)
        done, live = await self._fetch(key)
        retained = None if done is None else _decoder.decode(done.value)
        checkpoint = None if live is None else _decoder.decode(live.value)
        if (
            live is not None
            and retained is not None
            and checkpoint is not None
            and retained.version >= checkpoint.version
        ):
            # A finish cut short (its coordinator died between the two writes) left the
            # checkpoint behind: the retained copy is newer, so drop it now. (A newer
            # checkpoint is a finished transaction being compensated, a cancel: it stays.)
            with contextlib.suppress(RevisionMismatchError):
                await self.live_bucket.delete(key, last_revision=live.revision)
            live = checkpoint = None
        if live is not None:
            self._revisions[transaction_id] = live.revision
        else:
            self._revisions.pop(transaction_id, None)
        # What is left of the two, the checkpoint newer if both are.
        return checkpoint if checkpoint is not None else retained

    async def load_start(self, transaction_id: str) -> TxState | None:
        # The retained copy first: a new transaction has none, and a live checkpoint makes the
        # first save (a create) conflict, after which the coordinator restarts with a full load.
        if await self.done.get(kv_key(transaction_id)) is None:
            self._revisions.pop(transaction_id, None)
            return None
        return await self.load(transaction_id)  # a duplicate start: the whole picture

    async def read(self, transaction_id: str) -> TxState | None:
        key = kv_key(transaction_id)
        done, live = await self._fetch(key)
        if done is None and live is None:
            # Both reads may have fallen between a retirement's two writes (the retained copy
            # is written first): look at the retained one again before saying "absent".
            done = await self.done.get(key)
        return _newest(done, live)

    async def _fetch(self, key: str) -> tuple[Entry | None, Entry | None]:
        """The key's entries in the retained and the live bucket."""
        if not self.transport.waits_for_io:
            return await self.done.get(key), await self.live_bucket.get(key)
        entries: list[Entry | None] = [None, None]  # one round trip for both buckets, not two

        async def fetch(i: int, bucket: KeyValue) -> None:
            entries[i] = await bucket.get(key)

        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, 0, self.done)
            tg.start_soon(fetch, 1, self.live_bucket)
        return entries[0], entries[1]

    async def save(self, state: TxState) -> None:
        tx = state.transaction_id
        key = kv_key(tx)
        data = _encoder.encode(state)
        revision = self._revisions.get(tx)
        try:
            if revision is None:
                self._revisions[tx] = await self.live_bucket.create(key, data)
            else:
                self._revisions[tx] = await self.live_bucket.update(key, data, revision)
        except (KeyExistsError, RevisionMismatchError) as exc:
            self._revisions.pop(tx, None)
            raise StoreConflictError(
                f"transaction {tx!r} was written by someone else since it was read"
            ) from exc

    async def finish(self, state: TxState, retention: float, *, forget: bool = True) -> None:
        tx = state.transaction_id
        key = kv_key(tx)
        if retention > 0:
            data = _encoder.encode(state)
            try:
                await self.done.create(key, data, ttl=retention)
            except KeyExistsError:
                await self._refinish(key, state, data, retention)
        if forget or retention <= 0:  # nothing retained to be newer than the checkpoint
            await self.forget(tx)

    async def _refinish(self, key: str, state: TxState, data: bytes, retention: float) -> None:
        """Retain ``state`` where a retained copy exists: nothing to write if it is that one
        (a finish let out again, after a restart or a takeover), else (finished again: a
        cancel after done) replace it in one compare-and-set write, which starts its ttl
        anew. Never a delete first: a failure in between would leave no copy at all."""
        entry = await self.done.get(key)
        if entry is None:  # it expired meanwhile
            await self.done.create(key, data, ttl=retention)
            return
        if _decoder.decode(entry.value).version >= state.version:
            return
        try:
            await self.done.update(key, data, entry.revision)
        except RevisionMismatchError as exc:
            raise StoreConflictError(
                f"transaction {state.transaction_id!r} was retained by someone else meanwhile"
            ) from exc

    async def forget(self, transaction_id: str) -> None:
        await self.live_bucket.delete(kv_key(transaction_id))
        self._revisions.pop(transaction_id, None)

    async def live(self, where: Callable[[str], bool] | None = None) -> list[TxState]:
        # Only the keys that pass are read: a takeover of one partition reads its own share.
        keep = None if where is None else (lambda key: where(transaction_id_of(key)))
        return await _states(self.live_bucket, keep)

    async def list(self, workflow: str | None = None) -> list[TxState]:
        states: dict[str, TxState] = {}
        # Live first: a transaction retired between the two reads is in one of them (its
        # retained copy is written before its checkpoint is deleted). The newer copy wins.
        for bucket in (self.live_bucket, self.done):
            for state in await _states(bucket):
                known = states.get(state.transaction_id)
                if known is None or state.version > known.version:
                    states[state.transaction_id] = state
        return [s for s in states.values() if workflow is None or s.workflow == workflow]


async def _states(bucket: KeyValue, keep: Callable[[str], bool] | None = None) -> list[TxState]:
    """Every state in a bucket whose key passes ``keep`` (a key deleted between listing and
    reading is left out)."""
    states = []
    for key in await bucket.keys():
        if keep is not None and not keep(key):
            continue
        entry = await bucket.get(key)
        if entry is not None:
            states.append(_decoder.decode(entry.value))
    return states
