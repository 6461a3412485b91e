"""Partition leases: assignment, acquisition, failover, hand-over, rebalancing and fencing.

The lease tests run on the memory transport and on a real nats-server, each in a bucket of its
own. Every owner process checks, whenever it acquires a partition, that no other owner holds it
and that the callbacks see ``holds()`` as promised; each test ends by asserting that no such
check failed. Waits have deadlines; ttls are whole seconds, as NATS counts them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from math import sqrt
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import pytest
from anyio.abc import TaskGroup
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import LeaseLostError, PartitionLeases
from actors._leases import assign
from transport import (
    Consumer,
    Entry,
    Handler,
    KeyValue,
    MemoryTransport,
    Msg,
    NatsServer,
    NatsTransport,
    QueueConfig,
    Subscription,
    Transport,
    TransportError,
    WorkHandler,
)

pytestmark = pytest.mark.anyio

# Lease ttls: NATS counts whole seconds; in memory a shorter one keeps the suite fast.
TTLS = {"memory": 0.5, "nats": 1.0}
PARTITIONS = 16
# Owner names whose split of PARTITIONS is even enough to assert balance on (see assign).
A, B, C = "a", "h", "c"
MAX_OWNERS = 3  # in one test


# --- assignment (pure) ------------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
member_sets = st.sets(names, min_size=1, max_size=12)


@given(partitions=st.integers(1, 300), members=member_sets)
def test_assign_gives_every_partition_to_exactly_one_member(
    partitions: int, members: set[str]
) -> None:
    owners = assign(partitions, members)
    assert sorted(owners) == list(range(partitions))
    assert set(owners.values()) <= members


@given(partitions=st.integers(1, 300), members=member_sets, data=st.data())
def test_assign_depends_only_on_the_set_of_members(
    partitions: int, members: set[str], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(sorted(members)))
    assert assign(partitions, shuffled) == assign(partitions, members)
    assert assign(partitions, [*shuffled, *shuffled]) == assign(partitions, members)


@settings(deadline=None)
@given(partitions=st.integers(16, 256), members=member_sets)
def test_assign_is_balanced_within_reason(partitions: int, members: set[str]) -> None:
    # Rendezvous hashing spreads like independent fair dice: each member's count is binomial.
    counts = Counter(assign(partitions, members).values())
    share = 1 / len(members)
    mean = partitions * share
    sd = sqrt(partitions * share * (1 - share))
    for member in members:
        assert abs(counts[member] - mean) <= 5 * sd + 1, (member, counts, mean)


@given(partitions=st.integers(1, 300), members=member_sets, data=st.data())
def test_removing_a_member_moves_only_its_partitions(
    partitions: int, members: set[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(sorted(members)))
    before = assign(partitions, members)
    after = assign(partitions, members - {gone})
    for p in range(partitions):
        if before[p] != gone:
            assert after[p] == before[p]
        else:
            assert after.get(p) != gone  # moved to a survivor (none if it was the last one)


@given(partitions=st.integers(1, 300), members=member_sets, new=names)
def test_adding_a_member_moves_only_partitions_to_it(
    partitions: int, members: set[str], new: str
) -> None:
    before = assign(partitions, members)
    after = assign(partitions, members | {new})
    assert all(after[p] in (before[p], new) for p in range(partitions))


def test_assign_without_members_assigns_nothing() -> None:
    assert assign(4, []) == {}


def test_the_test_owners_split_the_partitions_evenly() -> None:
    # The lease tests below assert balance for these names: keep them balanced.
    assert sorted(Counter(assign(PARTITIONS, [A, B]).values()).values()) == [8, 8]
    assert min(Counter(assign(PARTITIONS, [A, B, C]).values()).values()) >= 4


def test_parameters_are_checked() -> None:
    transport = MemoryTransport()

    async def nothing(partition: int) -> None:
        pass

    def make(**options: Any) -> PartitionLeases:
        settings: dict[str, Any] = {"bucket": "b", "partitions": 4, "owner": "me"}
        settings.update(options)
        return PartitionLeases(transport, on_acquired=nothing, on_lost=nothing, **settings)

    make()
    for bad in (
        {"partitions": 0},
        {"owner": "has space"},
        {"owner": ".dot"},
        {"ttl": 0},
        {"ttl": 3, "period": 3},
        {"ttl": 3, "margin": 2.5},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each names its own parameter
            make(**bad)


# --- a transport that can be cut off ----------------------------------------------------------


class Changes:
    """Something the test waits on: ``notify`` when it may have changed, ``until`` a condition."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def until(self, condition: Callable[[], bool], within: float) -> None:
        with anyio.fail_after(within):
            while not condition():
                if self._event is None:
                    self._event = anyio.Event()
                await self._event.wait()


class Cuttable(Transport):
    """Another transport, whose key-value operations fail with ``TransportError`` while ``cut``,
    and wait while ``hung`` (until ``hung`` is cleared).

    As a process sees a NATS outage: its leases cannot be renewed, the others' can.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.cut = False
        self.hung: anyio.Event | None = None  # set it to let the hung operations go on
        self.updates: Counter[str] = Counter()  # successful updates (renewals), per key
        self.updated = Changes()
        self.waits_for_io = inner.waits_for_io

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply: str | None = None,
    ) -> None:
        await self.inner.publish(subject, data, headers=headers, reply=reply)

    async def subscribe(
        self, subject: str, handler: Handler, *, queue: str | None = None
    ) -> Subscription:
        return await self.inner.subscribe(subject, handler, queue=queue)

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Msg:
        return await self.inner.request(subject, data, headers=headers, timeout=timeout)

    async def ensure_queue(self, config: QueueConfig) -> None:
        await self.inner.ensure_queue(config)

    async def enqueue(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> bool:
        return await self.inner.enqueue(subject, data, headers=headers, msg_id=msg_id)

    async def consume(
        self,
        queue: str,
        durable: str,
        filter_subject: str,
        handler: WorkHandler,
        *,
        max_in_flight: int = 64,
    ) -> Consumer:
        return await self.inner.consume(
            queue, durable, filter_subject, handler, max_in_flight=max_in_flight
        )

    async def open_kv(
        self, bucket: str, *, ttl: float | None = None, history: int = 1, **options: Any
    ) -> KeyValue:
        return _CuttableKeyValue(
            await self.inner.open_kv(bucket, ttl=ttl, history=history, **options), self
        )


class _CuttableKeyValue(KeyValue):
    def __init__(self, inner: KeyValue, switch: Cuttable) -> None:
        self._inner = inner
        self._switch = switch

    async def _check(self) -> None:
        if self._switch.hung is not None:
            await self._switch.hung.wait()
        if self._switch.cut:
            raise TransportError("cut off from the server (test)")

    async def get(self, key: str) -> Entry | None:
        await self._check()
        return await self._inner.get(key)

    async def put(self, key: str, value: bytes) -> int:
        await self._check()
        return await self._inner.put(key, value)

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        await self._check()
        return await self._inner.create(key, value, ttl=ttl)

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        await self._check()
        revision = await self._inner.update(key, value, last_revision)
        self._switch.updates[key] += 1
        self._switch.updated.notify()
        return revision

    async def delete(self, key: str, *, last_revision: int | None = None) -> None:
        await self._check()
        await self._inner.delete(key, last_revision=last_revision)

    async def keys(self) -> list[str]:
        await self._check()
        return await self._inner.keys()


# --- owners -----------------------------------------------------------------------------------


class FakeClock:
    """A fencing clock the test moves by hand (it starts at the real one and follows it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Owner:
    """One coordinator process: its leases, what its callbacks saw, and its own connection."""

    def __init__(
        self,
        world: World,
        name: str,
        transport: Cuttable,
        *,
        on_acquired: Callable[[int], Awaitable[None]] | None = None,
        **options: Any,
    ) -> None:
        self.world = world
        self.name = name
        self.transport = transport
        self.events: list[tuple[str, int, float]] = []  # (acquired|lost, partition, when)
        self.holder_on_lost: dict[int, str | None] = {}  # who the key named during on_lost
        self._extra = on_acquired
        self.leases = PartitionLeases(
            transport,
            bucket=world.bucket,
            partitions=PARTITIONS,
            owner=name,
            on_acquired=self._acquired,
            on_lost=self._lost,
            ttl=world.ttl,
            **options,
        )
        self.scope = anyio.CancelScope()
        self.ended = anyio.Event()
        self.kv: KeyValue | None = None

    def __repr__(self) -> str:
        return f"<Owner {self.name}>"

    async def _acquired(self, partition: int) -> None:
        self.events.append(("acquired", partition, time.monotonic()))
        # Once this returns, holds(p) turns true before any other task runs: waiters see it.
        self.world.changes.notify()
        if self.leases.holds(partition) or partition in self.leases.owned:
            self.world.violations.append(f"{self}: holds {partition} before on_acquired returned")
        for other in self.world.owners:
            if other is not self and other.leases.holds(partition):
                self.world.violations.append(f"{self} acquired {partition}, {other} holds it")
        if self._extra is not None:
            await self._extra(partition)

    async def _lost(self, partition: int) -> None:
        self.events.append(("lost", partition, time.monotonic()))
        self.world.changes.notify()
        if self.leases.holds(partition) or partition in self.leases.owned:
            self.world.violations.append(f"{self}: holds {partition} in on_lost")
        assert self.kv is not None
        with contextlib.suppress(TransportError):
            self.holder_on_lost[partition] = await holder(self.kv, partition)

    async def run(self) -> None:
        try:
            with self.scope:
                await self.leases.run()
        finally:
            self.ended.set()
            self.world.changes.notify()

    def crash(self) -> None:
        """Stop renewing without giving anything back, as a killed process does."""
        self.scope.cancel()

    def acquired(self, since: float = 0.0) -> list[int]:
        return [p for kind, p, when in self.events if kind == "acquired" and when >= since]

    def lost(self, since: float = 0.0) -> list[int]:
        return [p for kind, p, when in self.events if kind == "lost" and when >= since]

    def share(self, *among: Owner) -> frozenset[int]:
        """What belongs to this owner when ``among`` are the live ones."""
        owners = assign(PARTITIONS, [o.name for o in among])
        return frozenset(p for p, name in owners.items() if name == self.name)


class World:
    """The owners of one test, sharing a bucket (on a shared server), each run in a task."""

    def __init__(
        self, connect: Callable[[], Awaitable[Transport]], bucket: str, ttl: float
    ) -> None:
        self._connect = connect
        self.bucket = bucket
        self.ttl = ttl
        self.period = ttl / 3  # the default renewal period
        self.owners: list[Owner] = []
        self.violations: list[str] = []
        self.changes = Changes()  # notified by every callback of every owner
        self._tasks: TaskGroup | None = None

    async def start(self, name: str, **options: Any) -> Owner:
        owner = Owner(self, name, Cuttable(await self._connect()), **options)
        await owner.leases.open()
        owner.kv = await owner.transport.open_kv(self.bucket)
        self.owners.append(owner)
        assert self._tasks is not None
        self._tasks.start_soon(owner.run)
        return owner

    async def settled(self, *owners: Owner, within: float) -> float:
        """Wait until exactly ``owners`` own exactly their shares; return how long it took."""
        started = time.monotonic()

        def done() -> bool:
            return all(o.leases.owned == o.share(*owners) for o in owners) and not any(
                o.leases.owned for o in self.owners if o not in owners
            )

        await self.changes.until(done, within)
        return time.monotonic() - started

    async def __aenter__(self) -> Self:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()
        await self._tasks.__aexit__(*exc_info)


async def holder(kv: KeyValue, partition: int) -> str | None:
    """Who the lease key of ``partition`` names, or None if it is absent."""
    entry = await kv.get(f"p-{partition}")
    return None if entry is None else msgspec.json.decode(entry.value)["owner"]


@pytest.fixture(
    params=[pytest.param("memory"), pytest.param("nats", marks=pytest.mark.nats)],
)
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """A World on a fresh memory transport, or on the session's nats-server."""
    bucket = f"leases_{uuid.uuid4().hex[:12]}"
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "memory":
            shared = await stack.enter_async_context(MemoryTransport())

            async def connect() -> Transport:
                return shared

        else:
            # One connection per owner, opened before the owners' task group (their own task
            # groups must nest inside it, not across it).
            server: NatsServer = request.getfixturevalue("nats_server")
            pool = [
                await stack.enter_async_context(
                    NatsTransport(server.url, name=f"{request.node.name}-{i}")
                )
                for i in range(MAX_OWNERS)
            ]

            async def connect() -> Transport:
                return pool.pop()

        async with World(connect, bucket, TTLS[request.param]) as w:
            yield w
        assert w.violations == []


# --- leases -----------------------------------------------------------------------------------


async def test_a_single_owner_gets_every_partition(world: World) -> None:
    a = await world.start(A)
    await world.settled(a, within=3 * world.ttl)
    assert a.leases.owned == frozenset(range(PARTITIONS))
    assert all(a.leases.holds(p) for p in range(PARTITIONS))
    assert sorted(a.acquired()) == list(range(PARTITIONS))  # each once
    assert a.lost() == []
    assert a.kv is not None
    assert [await holder(a.kv, p) for p in range(PARTITIONS)] == [A] * PARTITIONS
    assert a.leases.members == (A,)


async def test_two_owners_split_the_partitions(world: World) -> None:
    a, b = await world.start(A), await world.start(B)
    await world.settled(a, b, within=4 * world.ttl)
    assert a.leases.owned.isdisjoint(b.leases.owned)
    assert a.leases.owned | b.leases.owned == frozenset(range(PARTITIONS))
    assert len(a.leases.owned) == len(b.leases.owned) == PARTITIONS // 2
    assert a.kv is not None
    for p in range(PARTITIONS):  # the keys agree: each names the one owner that holds it
        assert await holder(a.kv, p) == (A if a.leases.holds(p) else B)


async def test_a_crashed_owner_loses_its_partitions_to_the_survivor(world: World) -> None:
    a, b = await world.start(A), await world.start(B)
    await world.settled(a, b, within=4 * world.ttl)
    b_share = b.leases.owned
    crashed = time.monotonic()
    b.crash()
    took = await world.settled(a, within=3 * world.ttl)
    # Its leases expired on their own (b never gave them back); a waited for that.
    assert took <= 2 * world.ttl
    assert took >= world.ttl - world.period - 0.1
    assert b.lost(since=crashed) == []  # a crash runs no callbacks...
    assert b.leases.owned == frozenset()  # ...but nothing renews: b holds nothing any more
    assert set(a.acquired()) >= b_share


async def test_release_hands_the_partitions_over_at_once(world: World) -> None:
    a, b = await world.start(A), await world.start(B)
    await world.settled(a, b, within=4 * world.ttl)
    b_share = b.leases.owned
    b.holder_on_lost.clear()
    started = time.monotonic()
    await b.leases.release()
    assert b.leases.owned == frozenset()
    assert sorted(b.lost(since=started)) == sorted(b_share)
    # While b's on_lost ran, its key still named b: a could not start before b stopped.
    assert b.holder_on_lost == dict.fromkeys(b_share, B)
    took = await world.settled(a, within=world.ttl)
    assert time.monotonic() - started < 0.75 * world.ttl  # at a's next round, long before the ttl
    assert took < 0.75 * world.ttl
    with anyio.fail_after(world.ttl):
        await b.ended.wait()  # release ends run
    assert b.kv is not None
    assert B not in {k[2:] for k in await b.kv.keys() if k.startswith("m-")}


async def test_fencing_by_the_local_clock(world: World) -> None:
    clock = FakeClock()
    a = await world.start(A, clock=clock)
    await world.settled(a, within=3 * world.ttl)
    before = time.monotonic()
    # Renewals "stop" for longer than ttl - margin: holds() turns false at once, by itself.
    clock.advance(world.ttl)
    assert not any(a.leases.holds(p) for p in range(PARTITIONS))
    assert a.leases.owned == frozenset()
    with pytest.raises(LeaseLostError):
        a.leases.check(0)
    # on_lost follows for each, then, the keys having expired, a takes them again normally.
    await world.settled(a, within=3 * world.ttl)
    assert sorted(a.lost(since=before)) == list(range(PARTITIONS))
    assert sorted(a.acquired(since=before)) == list(range(PARTITIONS))
    for p in range(PARTITIONS):
        kinds = [kind for kind, q, _ in a.events if q == p]
        assert kinds == ["acquired", "lost", "acquired"]


async def test_fencing_when_cut_off_from_the_server(world: World) -> None:
    a, b = await world.start(A), await world.start(B)
    await world.settled(a, b, within=4 * world.ttl)
    b_share = b.leases.owned
    cut = time.monotonic()
    b.transport.cut = True
    await world.settled(a, within=3 * world.ttl)
    # b stopped (holds false, then on_lost) before its leases could expire on the server...
    lost_at = {p: when for kind, p, when in b.events if kind == "lost" and when >= cut}
    assert set(lost_at) == b_share
    assert all(when - cut < world.ttl for when in lost_at.values())
    # ...hence before a acquired them (every acquisition also checked b.holds(p) was false).
    acquired_at = {p: when for kind, p, when in a.events if kind == "acquired" and when >= cut}
    assert set(acquired_at) == b_share
    assert all(lost_at[p] < acquired_at[p] for p in b_share)
    assert all(
        acquired_at[p] - cut >= world.ttl - world.period - 0.1 for p in b_share
    )  # after expiry
    # Connected again: b rejoins and takes its share back, as a newcomer would.
    b.transport.cut = False
    await world.settled(a, b, within=4 * world.ttl)
    assert b.leases.owned == b_share


async def test_leases_run_out_while_the_server_does_not_answer(world: World) -> None:
    a = await world.start(A)
    await world.settled(a, within=3 * world.ttl)
    hung = time.monotonic()
    a.transport.hung = resume = anyio.Event()  # the round now waits on its first operation
    await world.changes.until(lambda: len(a.lost(since=hung)) == PARTITIONS, 2 * world.ttl)
    assert time.monotonic() - hung < world.ttl  # by the deadlines alone, before any expiry
    assert a.leases.owned == frozenset()
    a.transport.hung = None
    resume.set()
    await world.settled(a, within=3 * world.ttl)  # the answers come: acquired again normally
    assert sorted(a.acquired(since=hung)) == list(range(PARTITIONS))


async def test_a_third_owner_takes_only_its_share(world: World) -> None:
    a, b = await world.start(A), await world.start(B)
    await world.settled(a, b, within=4 * world.ttl)
    before = {A: a.leases.owned, B: b.leases.owned}
    b.holder_on_lost.clear()
    joined = time.monotonic()
    c = await world.start(C)
    took = await world.settled(a, b, c, within=4 * world.ttl)
    assert took < 2 * world.ttl  # no expiry waited for: the others hand the partitions over
    moved = c.leases.owned
    assert moved == c.share(a, b, c)
    assert a.leases.owned == before[A] - moved
    assert b.leases.owned == before[B] - moved
    # Only the needed moves: a and b lost exactly what c took, and acquired nothing.
    assert sorted(a.lost(since=joined) + b.lost(since=joined)) == sorted(moved)
    assert a.acquired(since=joined) == b.acquired(since=joined) == []
    assert b.holder_on_lost == dict.fromkeys(before[B] & moved, B)  # handed over, not expired


async def test_callbacks_run_outside_holds(world: World) -> None:
    gate = anyio.Event()
    entered = anyio.Event()

    async def slow(partition: int) -> None:
        entered.set()
        await gate.wait()

    a = await world.start(A, on_acquired=slow)
    with anyio.fail_after(3 * world.ttl):
        await entered.wait()
    # The leases are written (nobody else can take them) but not held until on_acquired returns;
    # meanwhile renewals go on (a slow callback must not let its lease lapse).
    assert a.kv is not None
    keys = [f"p-{p}" for p in range(PARTITIONS)]
    # Renewed for longer than the ttl (4 periods): the written leases live on.
    await a.transport.updated.until(
        lambda: min(a.transport.updates[k] for k in keys) >= 4, 4 * world.ttl
    )
    assert a.leases.owned == frozenset()
    assert [await holder(a.kv, p) for p in range(PARTITIONS)] == [A] * PARTITIONS
    gate.set()
    await a.leases.wait_owned(timeout=2 * world.ttl)
    assert a.leases.owned == frozenset(range(PARTITIONS))
    assert a.lost() == []
    await a.leases.release()
    assert sorted(a.lost()) == list(range(PARTITIONS))
    assert a.holder_on_lost == dict.fromkeys(range(PARTITIONS), A)  # deleted after on_lost
    assert [await holder(a.kv, p) for p in range(PARTITIONS)] == [None] * PARTITIONS


async def test_a_failing_on_acquired_gives_the_lease_back_and_is_retried(world: World) -> None:
    failures = {3: 2}  # partition 3 fails twice, then works

    async def flaky(partition: int) -> None:
        if failures.get(partition):
            failures[partition] -= 1
            raise RuntimeError("cannot start the partition (test)")

    a = await world.start(A, on_acquired=flaky)
    await world.settled(a, within=4 * world.ttl)
    kinds = [kind for kind, p, _ in a.events if p == 3]
    assert kinds == ["acquired", "lost", "acquired", "lost", "acquired"]
    assert failures == {3: 0}
