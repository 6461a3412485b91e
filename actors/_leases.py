"""Partition leases: which coordinator process owns which partitions, over a key-value bucket.

Every partition ``n`` has a lease key ``p-<n>`` and every live coordinator process a membership
key ``m-<owner>``, both created with the bucket's per-key ttl and kept alive by compare-and-set
renewals (``KeyValue.update`` restarts a key's countdown). The live members decide, through
rendezvous hashing (``assign``), which member each partition should belong to; each process
acquires the absent leases of its own partitions, gives back (deletes) those that now belong to
another live member, and never touches a lease held by someone else: a dead holder's lease
expires on its own.

Fencing is by time: ``holds(p)`` is true only until ``ttl - margin`` seconds after the start of
the last successful write of the lease, while the key lives at least ``ttl`` seconds after that
write reached the server. So a process cut off from the server stops processing a partition
before another process could acquire it, without hearing from anybody.

One round (every ``period`` seconds) reads the keys once, renews the membership and each held
lease (side by side on a network transport), and writes only what changes hands.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Literal

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup

from transport import KeyExistsError, KeyValue, RevisionMismatchError, Transport

__all__ = ["LeaseLostError", "PartitionLeases", "assign"]

log = structlog.get_logger("orchestrator.leases")

_LEASE_PREFIX = "p-"
_MEMBER_PREFIX = "m-"
# What an owner id may be: it becomes part of a key (letters, digits, ``-_=.``, no edge dots).
_OWNER = re.compile(r"[A-Za-z0-9_=-]([A-Za-z0-9_=.-]*[A-Za-z0-9_=-])?")


class LeaseLostError(Exception):
    """This process no longer owns the partition: it must stop processing it (fencing)."""


class _Holder(msgspec.Struct, frozen=True):
    """The value of a lease or membership key (JSON, so ``nats kv get`` shows who holds it)."""

    owner: str


_encode = msgspec.json.Encoder().encode


def _weight(partition: int, member: str) -> int:
    # A stable hash (never Python's salted hash()): every process must compute the same.
    digest = hashlib.blake2b(f"{partition}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(partitions: int, members: Iterable[str]) -> dict[int, str]:
    """The member each partition ``0..partitions-1`` belongs to, by rendezvous hashing.

    Each partition goes to the member with the highest weight ``hash(partition, member)``, so
    every process computes the same assignment from the same members, and adding or removing a
    member moves only partitions to or from that member. No members: an empty mapping.
    """
    ranked = sorted(set(members))
    if not ranked:
        return {}
    return {p: max(ranked, key=lambda m: (_weight(p, m), m)) for p in range(partitions)}


_State = Literal["acquiring", "held", "releasing"]


class _Lease:
    """A lease this process has written: the revision to renew from and its fencing deadline."""

    __slots__ = ("deadline", "key", "partition", "revision", "state")

    def __init__(self, partition: int, revision: int, deadline: float) -> None:
        self.partition = partition
        self.key = f"{_LEASE_PREFIX}{partition}"
        self.revision = revision
        self.deadline = deadline  # clock() before which the lease surely has not expired
        # acquiring: on_acquired runs; held: holds() may be true; releasing: on_lost runs or
        # the key is about to be deleted (given back to the member it now belongs to).
        self.state: _State = "acquiring"


class PartitionLeases:
    """Exclusive, time-bounded ownership of some of ``partitions`` partitions, for one process.

    Call ``open`` once, then run ``run`` in a task for as long as the process serves partitions;
    ``release`` gives everything back at once (graceful stop). The callbacks:

    * ``on_acquired(p)`` is awaited before ``p`` is in ``owned`` and ``holds(p)`` turns true:
      start processing the partition there (the lease is already written, so nobody else holds
      it). If it raises, the lease is given back (and ``on_lost(p)`` is still awaited, to undo
      what it did).
    * ``on_lost(p)`` is awaited after ``holds(p)`` turned false: stop processing the partition.
      On a voluntary hand-over the key is deleted only once it returns, so the next owner starts
      after this one stopped; on an involuntary loss (expiry, someone else took it) the next owner
      may already be running.

    Every ``on_acquired(p)`` is followed by exactly one ``on_lost(p)`` (unless ``run`` is
    cancelled without ``release``, i.e. a crash); the two alternate for one partition, and
    callbacks of different partitions may run concurrently. The callbacks run in tasks of
    ``run``: a slow one delays no renewal.

    ``ttl`` is how long a lease lives without renewal (whole seconds on NATS, which rounds it
    up); leases are renewed every ``period`` seconds (default ``ttl / 3``) and ``holds`` turns
    false ``margin`` seconds (default ``max(ttl / 5, period)``) before the lease could expire.
    ``clock`` is the fencing clock (monotonic seconds); tests may pass a controllable one.

    Timing, for the defaults: a crashed holder's partitions are taken over at most about
    ``ttl + period`` after its last renewal (the lease expires, the next round of their new
    owner creates it); a released or handed-over partition at the next round of its new owner
    (at most ``period``, plus the old owner's ``on_lost``); a process that joins gets its share
    within about two periods. A process whose renewals fail stops holding ``ttl - margin``
    after its last successful write started, at least ``margin`` before the lease can expire.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        bucket: str,
        partitions: int,
        owner: str,
        on_acquired: Callable[[int], Awaitable[None]],
        on_lost: Callable[[int], Awaitable[None]],
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        period: float | None = None,
        margin: float | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        if _OWNER.fullmatch(owner) is None:
            raise ValueError(f"owner {owner!r} must be letters, digits and -_=. (no edge dots)")
        if not (ttl > 0 and math.isfinite(ttl)):
            raise ValueError(f"ttl must be positive seconds, not {ttl}")
        period = ttl / 3 if period is None else period
        margin = max(ttl / 5, period) if margin is None else margin
        if not period > 0 or not margin >= 0 or not period < ttl - margin:
            # A lease must be renewed before holds() turns false, or it would flap.
            raise ValueError(
                f"need 0 < period < ttl - margin, not period={period}, ttl={ttl}, margin={margin}"
            )
        self.transport = transport
        self.bucket = bucket
        self.partitions = partitions
        self.owner = owner
        self.ttl = ttl
        self.period = period
        self.margin = margin
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._clock = clock
        self._value = _encode(_Holder(owner))
        self._member_key = f"{_MEMBER_PREFIX}{owner}"
        self._kv: KeyValue | None = None
        self._member_revision: int | None = None
        self._leases: dict[int, _Lease] = {}  # every lease key we wrote and still renew
        self._deadlines: dict[int, float] = {}  # the held ones: what holds() reads
        self._announced: set[int] = set()  # on_acquired called, on_lost not yet
        self._busy: set[int] = set()  # a callback of the partition is running
        self._members: tuple[str, ...] = ()
        self._target: frozenset[int] = frozenset()  # ours, by the last view of the members
        self._viewed = False
        self._closing = False
        self._released = False
        self._running = False
        self._lock: anyio.Lock | None = None  # made in async context: serialises lease writes
        self._changed: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._tasks: TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<PartitionLeases {self.owner!r} of {self.bucket!r}: {sorted(self.owned)}>"

    # --- the hot path -----------------------------------------------------------------------

    def holds(self, partition: int) -> bool:
        """Whether this process owns ``partition`` right now and may process it.

        True only between ``on_acquired`` returning and the lease's fencing deadline (which each
        renewal moves on), and never again for this tenure once it turned false.
        """
        deadline = self._deadlines.get(partition)
        return deadline is not None and self._clock() < deadline

    def writable(self, partition: int) -> bool:
        """Whether this process may process and write ``partition`` now: like ``holds``, but
        already while ``on_acquired`` runs (the lease is written, nobody else has it), so that
        callback may resume the partition's work. False once the loss is known, and during
        ``on_lost``."""
        lease = self._leases.get(partition)
        return lease is not None and lease.state != "releasing" and self._clock() < lease.deadline

    def check(self, partition: int) -> None:
        """Raise ``LeaseLostError`` unless ``holds(partition)``: call it right before a write."""
        if not self.holds(partition):
            raise LeaseLostError(f"partition {partition} is not leased by {self.owner!r}")

    @property
    def owned(self) -> frozenset[int]:
        """The partitions ``holds`` is true for."""
        now = self._clock()
        return frozenset(p for p, deadline in self._deadlines.items() if now < deadline)

    @property
    def members(self) -> tuple[str, ...]:
        """The live members seen by the last round (sorted; this process included)."""
        return self._members

    @property
    def target(self) -> frozenset[int]:
        """The partitions that belong to this process by the last round's view of the members."""
        return self._target

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the bucket, or open it if it exists."""
        if self._kv is None:
            self._kv = await self.transport.open_kv(self.bucket)

    async def run(self) -> None:
        """Renew, acquire and give back leases every ``period`` seconds until cancelled.

        Returns after ``release``. Errors of the transport are logged and never end it. When it
        ends (cancelled), ``holds`` is false for every partition at once, since nothing renews
        them any more; ``on_lost`` is not called then (see ``release``).
        """
        if self._running:
            raise RuntimeError("PartitionLeases.run is already running")
        await self.open()
        self._running = True
        self._stop = stop = anyio.Event()
        watch = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._watch_deadlines, watch)
                next_round = anyio.current_time()
                while not self._closing:
                    try:
                        await self._round()
                    except Exception:  # never let one bad round end the leases
                        log.exception("lease round failed", owner=self.owner)
                    # A fixed rate, so slow rounds do not stretch the renewal period.
                    next_round = max(next_round + self.period, anyio.current_time())
                    with anyio.move_on_after(next_round - anyio.current_time()):
                        await stop.wait()
                # Closing: let running callbacks finish (release() waits for them).
                watch.cancel()
        finally:
            self._tasks = None
            self._running = False
            self._deadlines.clear()
            self._notify()

    async def release(self) -> None:
        """Give every lease back at once and leave the members (graceful stop).

        ``holds`` turns false for every partition at once, then ``on_lost`` is awaited for
        each (concurrently), then the lease and membership keys are deleted, so other processes
        can take the partitions over at their next round. Running callbacks are waited for
        first. Ends ``run``; the instance cannot be used again.
        """
        if self._released:
            return
        self._closing = True
        if self._stop is not None:
            self._stop.set()
        async with self._get_lock():
            while self._busy:  # they finish on their own; none starts while closing
                await self._next_change()
            leases = list(self._leases.values())
            self._leases.clear()
            self._deadlines.clear()
            self._notify()
            async with anyio.create_task_group() as tasks:
                for partition in sorted(self._announced):
                    tasks.start_soon(self._call_lost, partition)
            kv = self._kv
            if kv is not None:
                async with anyio.create_task_group() as tasks:
                    for lease in leases:
                        tasks.start_soon(self._delete, kv, lease.key, lease.revision)
                    if self._member_revision is not None:
                        tasks.start_soon(self._delete, kv, self._member_key, self._member_revision)
            self._member_revision = None
            self._released = True
        log.info("partition leases released", owner=self.owner, partitions=len(leases))

    async def wait_owned(self, count: int | None = None, timeout: float = 30.0) -> None:
        """Wait until this process owns ``count`` partitions (default: exactly its fair share).

        The fair share is ``target``, the partitions that belong to it by its latest view of
        the members. Raises ``TimeoutError`` after ``timeout`` seconds. A helper for tests and
        operations.
        """
        with anyio.fail_after(timeout):
            while True:
                owned = self.owned
                if count is None:
                    if self._viewed and owned == self._target:
                        return
                elif len(owned) == count:
                    return
                # Also wake now and then: holds() may turn false by the clock alone.
                with anyio.move_on_after(self.period):
                    await self._next_change()

    # --- rounds -----------------------------------------------------------------------------

    async def _round(self) -> None:
        kv = self._kv
        assert kv is not None
        async with self._get_lock():
            if self._closing:
                return
            self._expire_overdue()
            start = self._clock()
            # Renewals first: they keep what we have, whatever the view below says.
            failures: list[BaseException] = []
            jobs: list[Callable[[], Coroutine[Any, Any, None]]] = [
                functools.partial(self._renew_membership, kv, failures)
            ]
            jobs += [
                functools.partial(self._renew, kv, lease, start, failures)
                for lease in list(self._leases.values())
            ]
            await self._side_by_side(jobs)
            if failures:
                log.warning(
                    "lease renewals failed",
                    owner=self.owner,
                    failed=len(failures),
                    error=repr(failures[0]),
                )
            try:
                keys = await kv.keys()
            except Exception as exc:
                log.warning("cannot list the lease keys", owner=self.owner, error=repr(exc))
                return
            self._view(keys)
            if self._closing:
                return
            present = {k for k in keys if k.startswith(_LEASE_PREFIX)}
            for partition, lease in list(self._leases.items()):
                # Ours no more, and its member is live (it is in the view): hand it over now.
                if (
                    lease.state == "held"
                    and partition not in self._target
                    and partition not in self._busy
                ):
                    self._give_back(lease)
            wanted = [
                p
                for p in sorted(self._target)
                if p not in self._leases
                and p not in self._busy
                and f"{_LEASE_PREFIX}{p}" not in present
            ]
            if wanted:
                start = self._clock()
                await self._side_by_side(
                    [functools.partial(self._acquire, kv, p, start) for p in wanted]
                )

    def _view(self, keys: list[str]) -> None:
        members = {k[len(_MEMBER_PREFIX) :] for k in keys if k.startswith(_MEMBER_PREFIX)}
        members.add(self.owner)  # we are live, even if our membership write just failed
        ranked = tuple(sorted(members))
        if ranked != self._members or not self._viewed:
            owners = assign(self.partitions, ranked)
            self._target = frozenset(p for p, m in owners.items() if m == self.owner)
            if ranked != self._members:
                log.info("lease members changed", owner=self.owner, members=list(ranked))
            self._members = ranked
            self._viewed = True
            self._notify()

    async def _side_by_side(self, jobs: list[Callable[[], Coroutine[Any, Any, None]]]) -> None:
        # On a network transport writes side by side save round trips; in memory they'd cost.
        if self.transport.waits_for_io and len(jobs) > 1:
            async with anyio.create_task_group() as tasks:
                for job in jobs:
                    tasks.start_soon(job)
        else:
            for job in jobs:
                await job()

    async def _renew_membership(self, kv: KeyValue, failures: list[BaseException]) -> None:
        try:
            if self._member_revision is not None:
                try:
                    self._member_revision = await kv.update(
                        self._member_key, self._value, self._member_revision
                    )
                    return
                except RevisionMismatchError:
                    self._member_revision = None  # expired (we were away too long): anew
            try:
                self._member_revision = await kv.create(self._member_key, self._value, ttl=self.ttl)
            except KeyExistsError:
                # Our own key, left by an earlier run under the same owner id: carry it on.
                entry = await kv.get(self._member_key)
                if entry is not None:
                    self._member_revision = await kv.update(
                        self._member_key, self._value, entry.revision
                    )
        except Exception as exc:
            failures.append(exc)

    async def _renew(
        self, kv: KeyValue, lease: _Lease, start: float, failures: list[BaseException]
    ) -> None:
        try:
            revision = await kv.update(lease.key, self._value, lease.revision)
        except RevisionMismatchError:
            self._drop(lease, "taken or expired")
            return
        except Exception as exc:  # it runs out locally unless a later renewal succeeds
            failures.append(exc)
            return
        if self._leases.get(lease.partition) is not lease:
            return  # dropped meanwhile (by the deadline watch)
        lease.revision = revision
        if self._clock() >= lease.deadline:
            # holds() turned false while the write was in flight: this tenure is over, even if
            # the key is still ours (the loss was announced by time; no holds() flapping).
            self._drop(lease, "renewed too late")
            return
        lease.deadline = start + self.ttl - self.margin
        if lease.state == "held":
            self._deadlines[lease.partition] = lease.deadline

    async def _acquire(self, kv: KeyValue, partition: int, start: float) -> None:
        try:
            revision = await kv.create(f"{_LEASE_PREFIX}{partition}", self._value, ttl=self.ttl)
        except KeyExistsError:
            return  # someone else (or our view was stale): not ours to take
        except Exception as exc:
            log.warning(
                "cannot acquire a lease", owner=self.owner, partition=partition, error=repr(exc)
            )
            return
        lease = self._leases[partition] = _Lease(
            partition, revision, start + self.ttl - self.margin
        )
        self._busy.add(partition)
        self._spawn(self._announce, lease)

    # --- losing leases ----------------------------------------------------------------------

    def _expire_overdue(self) -> None:
        now = self._clock()
        for lease in list(self._leases.values()):
            if now >= lease.deadline:
                self._drop(lease, "not renewed in time")

    async def _watch_deadlines(self, scope: anyio.CancelScope) -> None:
        # on_lost must come when a lease runs out, even while a round hangs on the network.
        with scope:
            while True:
                leases = self._leases.values()
                earliest = min((lease.deadline for lease in leases), default=math.inf)
                await anyio.sleep(min(self.period, max(0.0, earliest - self._clock())))
                self._expire_overdue()

    def _drop(self, lease: _Lease, reason: str) -> None:
        """Forget a lease we no longer have: holds() false now, on_lost in a task."""
        partition = lease.partition
        if self._leases.get(partition) is not lease:
            return
        del self._leases[partition]
        self._deadlines.pop(partition, None)
        self._notify()
        log.warning("partition lease lost", owner=self.owner, partition=partition, reason=reason)
        # A running callback (on_acquired, or on_lost of a hand-over) sees this when it is done.
        if partition in self._announced and partition not in self._busy:
            self._busy.add(partition)
            self._spawn(self._lose, partition)

    def _give_back(self, lease: _Lease) -> None:
        lease.state = "releasing"
        self._deadlines.pop(lease.partition, None)  # holds() false before on_lost
        self._notify()
        self._busy.add(lease.partition)
        self._spawn(self._hand_over, lease)

    async def _lose(self, partition: int) -> None:
        try:
            await self._call_lost(partition)
        finally:
            self._done(partition)

    async def _hand_over(self, lease: _Lease) -> None:
        partition = lease.partition
        try:
            await self._call_lost(partition)
        finally:
            self._done(partition)
        await self._delete_lease(lease)
        log.info("partition lease handed over", owner=self.owner, partition=partition)

    async def _announce(self, lease: _Lease) -> None:
        partition = lease.partition
        give_back = False
        try:
            self._announced.add(partition)
            try:
                await self._on_acquired(partition)
            except Exception:
                log.exception("on_acquired failed", owner=self.owner, partition=partition)
                give_back = True
            else:
                if self._leases.get(partition) is lease and not self._closing:
                    lease.state = "held"
                    self._deadlines[partition] = lease.deadline
                    self._notify()
                    log.info("partition lease acquired", owner=self.owner, partition=partition)
                    return
            # Failed, lost while it ran, or closing: undo it.
            lease.state = "releasing"
            await self._call_lost(partition)
        finally:
            self._done(partition)
        if give_back and not self._closing:
            await self._delete_lease(lease)

    async def _call_lost(self, partition: int) -> None:
        if partition not in self._announced:
            return
        self._announced.discard(partition)
        self._deadlines.pop(partition, None)
        self._notify()
        try:
            await self._on_lost(partition)
        except Exception:
            log.exception("on_lost failed", owner=self.owner, partition=partition)

    async def _delete_lease(self, lease: _Lease) -> None:
        kv = self._kv
        assert kv is not None
        async with self._get_lock():  # no renewal may move the revision meanwhile
            if self._leases.get(lease.partition) is not lease:
                return  # lost meanwhile, or release() took care of it
            del self._leases[lease.partition]
            await self._delete(kv, lease.key, lease.revision)

    async def _delete(self, kv: KeyValue, key: str, revision: int) -> None:
        try:
            await kv.delete(key, last_revision=revision)
        except RevisionMismatchError:
            pass  # gone already, or someone else's by now: not ours to delete
        except Exception as exc:  # it expires on its own
            log.warning("cannot delete a lease key", owner=self.owner, key=key, error=repr(exc))

    # --- plumbing ---------------------------------------------------------------------------

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        assert self._tasks is not None, "leases change hands only while run() runs"
        self._tasks.start_soon(fn, *args)

    def _done(self, partition: int) -> None:
        self._busy.discard(partition)
        self._notify()

    def _get_lock(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _next_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()
