"""The transport contract: one suite, run unchanged against every transport.

To run it against another transport, add one entry to ``TRANSPORTS``: a function that takes the
fixture request (to reach other fixtures, e.g. a nats-server) and returns a fresh, unentered
transport. Every test works in its own namespace (subjects, queue and bucket names), so the
suite also runs against a server shared by all tests.

Waits have deadlines; where a test checks that something does *not* happen, it waits a short,
bounded time for it.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

import anyio
import pytest

from transport import (
    Entry,
    KeyExistsError,
    KeyValue,
    MemoryTransport,
    Msg,
    NatsServer,
    NatsTransport,
    NoRespondersError,
    QueueConfig,
    RequestTimeoutError,
    RevisionMismatchError,
    Transport,
    TransportError,
    WorkMsg,
)

pytestmark = pytest.mark.anyio


def _nats(request: pytest.FixtureRequest) -> Transport:
    server: NatsServer = request.getfixturevalue("nats_server")
    return NatsTransport(server.url, name=request.node.name)


TRANSPORTS: dict[str, Callable[[pytest.FixtureRequest], Transport]] = {
    "memory": lambda request: MemoryTransport(),
    "nats": _nats,
}
"""How to make each transport under test (a fresh one per test)."""

QUIET = 0.1
"""How long to wait for something that must not happen."""

T = TypeVar("T")


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.nats] if name == "nats" else [])
        for name in TRANSPORTS
    ]
)
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    async with TRANSPORTS[request.param](request) as connected:
        yield connected


@pytest.fixture
def ns() -> str:
    """A namespace of this test's own, for subjects and names."""
    return f"t{uuid.uuid4().hex[:12]}"


class Recorder(Generic[T]):
    """A synchronous handler that records what it gets, and lets a test wait for it."""

    def __init__(self, fail_first: int = 0) -> None:
        self.items: list[T] = []
        self._fail = fail_first
        self._changed = anyio.Event()

    def __call__(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()
        if self._fail:
            self._fail -= 1
            raise RuntimeError("a handler that fails")

    async def wait_for(self, count: int, within: float = 5.0) -> list[T]:
        """Wait until ``count`` items arrived; return them."""
        with anyio.fail_after(within):
            await self._until(count)
        return self.items[:count]

    async def assert_quiet(self, within: float = QUIET) -> None:
        """Check that nothing more arrives within ``within`` seconds."""
        before = len(self.items)
        with anyio.move_on_after(within):
            await self._until(before + 1)
        assert self.items[before:] == []

    async def _until(self, count: int) -> None:
        while len(self.items) < count:
            self._changed = anyio.Event()
            await self._changed.wait()


async def queue(
    transport: Transport, ns: str, *, ack_wait: float = 30.0, max_deliver: int = 5
) -> QueueConfig:
    """Make the test's queue, capturing ``<ns>.work.>``."""
    config = QueueConfig(f"Q_{ns}", (f"{ns}.work.>",), max_deliver=max_deliver, ack_wait=ack_wait)
    await transport.ensure_queue(config)
    return config


def tagged(recorder: Recorder[tuple[str, T]], tag: str) -> Callable[[T], None]:
    """A handler recording into a shared recorder, with its tag."""

    def handler(item: T) -> None:
        recorder((tag, item))

    return handler


async def expired(kv: KeyValue, key: str) -> None:
    """Wait until a key has expired (polling: buckets offer no change notification)."""
    while await kv.get(key) is not None:  # noqa: ASYNC110 - nothing to wait on but the key
        await anyio.sleep(0.05)


def payloads(msgs: list[Msg] | list[WorkMsg]) -> list[bytes]:
    return [m.data for m in msgs]


# --- core messaging ---------------------------------------------------------------------------


async def test_publish_reaches_subscribers_whose_pattern_matches(
    transport: Transport, ns: str
) -> None:
    exact, one, mid, rest, under_a = (Recorder[Msg]() for _ in range(5))
    await transport.subscribe(f"{ns}.a.b", exact)
    await transport.subscribe(f"{ns}.a.*", one)
    await transport.subscribe(f"{ns}.*.b", mid)
    await transport.subscribe(f"{ns}.>", rest)
    await transport.subscribe(f"{ns}.a.>", under_a)

    for subject in ("a.b", "a.c", "x.b", "a.b.c"):
        await transport.publish(f"{ns}.{subject}", subject.encode(), headers={"k": subject})
    await transport.publish(ns, b"bare")  # '>' needs at least one more token

    assert payloads(await rest.wait_for(4)) == [b"a.b", b"a.c", b"x.b", b"a.b.c"]
    assert payloads(await exact.wait_for(1)) == [b"a.b"]
    assert payloads(await one.wait_for(2)) == [b"a.b", b"a.c"]
    assert payloads(await mid.wait_for(2)) == [b"a.b", b"x.b"]
    assert payloads(await under_a.wait_for(3)) == [b"a.b", b"a.c", b"a.b.c"]
    await rest.assert_quiet()
    assert len(exact.items) == 1
    assert len(one.items) == 2
    assert len(mid.items) == 2
    assert len(under_a.items) == 3
    msg = exact.items[0]
    assert msg.subject == f"{ns}.a.b"
    assert msg.headers is not None
    assert msg.headers["k"] == "a.b"
    assert msg.reply is None


async def test_unsubscribe_stops_delivery(transport: Transport, ns: str) -> None:
    gone, staying = Recorder[Msg](), Recorder[Msg]()
    subscription = await transport.subscribe(f"{ns}.x", gone)
    await transport.subscribe(f"{ns}.x", staying)
    await transport.publish(f"{ns}.x", b"1")
    await gone.wait_for(1)
    await subscription.unsubscribe()
    await subscription.unsubscribe()  # again: nothing happens
    await transport.publish(f"{ns}.x", b"2")
    await staying.wait_for(2)
    await gone.assert_quiet()


async def test_queue_group_gives_each_message_to_one_member(transport: Transport, ns: str) -> None:
    group = Recorder[tuple[str, Msg]]()
    for member in ("a", "b", "c"):
        await transport.subscribe(f"{ns}.job.*", tagged(group, member), queue="workers")
    everyone = Recorder[Msg]()
    await transport.subscribe(f"{ns}.job.*", everyone)

    sent = [str(i).encode() for i in range(30)]
    for data in sent:
        await transport.publish(f"{ns}.job.x", data)

    assert payloads(await everyone.wait_for(30)) == sent
    shared = await group.wait_for(30)
    await group.assert_quiet()
    assert sorted(msg.data for _, msg in shared) == sorted(sent)


async def test_failing_handler_does_not_stop_delivery(transport: Transport, ns: str) -> None:
    failing, healthy = Recorder[Msg](fail_first=1), Recorder[Msg]()
    await transport.subscribe(f"{ns}.x", failing)
    await transport.subscribe(f"{ns}.x", healthy)
    await transport.publish(f"{ns}.x", b"1")
    await transport.publish(f"{ns}.x", b"2")
    assert payloads(await healthy.wait_for(2)) == [b"1", b"2"]
    assert payloads(await failing.wait_for(2)) == [b"1", b"2"]


async def test_request_gets_the_reply(transport: Transport, ns: str) -> None:
    send, receive = anyio.create_memory_object_stream[Msg](10)

    async def respond() -> None:
        async with receive:
            async for msg in receive:
                assert msg.reply is not None
                await transport.publish(msg.reply, b"re:" + msg.data, headers={"by": "responder"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(respond)
        await transport.subscribe(f"{ns}.api.echo", send.send_nowait, queue="api")

        replies: dict[bytes, Msg] = {}

        async def ask(data: bytes) -> None:
            replies[data] = await transport.request(
                f"{ns}.api.echo", data, headers={"h": "1"}, timeout=5
            )

        async with anyio.create_task_group() as askers:
            for data in (b"a", b"b", b"c"):
                askers.start_soon(ask, data)
        send.close()

    assert {k: v.data for k, v in replies.items()} == {b"a": b"re:a", b"b": b"re:b", b"c": b"re:c"}
    headers = replies[b"a"].headers
    assert headers is not None
    assert headers["by"] == "responder"


async def test_request_without_responders_fails_fast(transport: Transport, ns: str) -> None:
    with anyio.fail_after(2), pytest.raises(NoRespondersError):
        await transport.request(f"{ns}.nobody", b"?", timeout=3)


async def test_request_times_out_without_reply(transport: Transport, ns: str) -> None:
    silent = Recorder[Msg]()
    await transport.subscribe(f"{ns}.silent", silent)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError) as caught:
        await transport.request(f"{ns}.silent", b"?", timeout=0.2)
    assert time.monotonic() - started >= 0.15
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, TransportError)
    assert len(silent.items) == 1


# --- work queues ------------------------------------------------------------------------------


async def test_enqueue_needs_a_queue_for_the_subject(transport: Transport, ns: str) -> None:
    await queue(transport, ns)
    with pytest.raises(TransportError):
        await transport.enqueue(f"{ns}.elsewhere", b"x")


async def test_consume_needs_the_queue(transport: Transport, ns: str) -> None:
    with pytest.raises(TransportError):
        await transport.consume(f"Q_{ns}", "d", f"{ns}.work.>", Recorder[WorkMsg]())


async def test_work_is_delivered_in_order_and_removed_when_acked(
    transport: Transport, ns: str
) -> None:
    await queue(transport, ns, ack_wait=0.2)
    for i in range(3):  # before anyone consumes: the queue keeps them
        await transport.enqueue(f"{ns}.work.a", b"%d" % i, headers={"n": str(i)})
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)

    first = await work.wait_for(3)
    assert payloads(first) == [b"0", b"1", b"2"]
    for i, msg in enumerate(first):
        assert msg.subject == f"{ns}.work.a"
        assert msg.num_delivered == 1
        assert msg.headers is not None
        assert msg.headers["n"] == str(i)
        await msg.ack()

    await transport.enqueue(f"{ns}.work.b", b"3")
    later = (await work.wait_for(4))[3]
    assert (later.subject, later.data) == (f"{ns}.work.b", b"3")
    await later.ack()
    await work.assert_quiet(0.3)  # past ack_wait: nothing comes back


async def test_nak_redelivers_at_once(transport: Transport, ns: str) -> None:
    await queue(transport, ns)  # ack_wait 30 s: a redelivery now can only be the nak's
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    await transport.enqueue(f"{ns}.work.a", b"x")
    (first,) = await work.wait_for(1)
    await first.nak()
    second = (await work.wait_for(2))[1]
    assert (second.data, second.num_delivered) == (b"x", 2)
    await second.ack()


async def test_nak_with_delay_redelivers_later(transport: Transport, ns: str) -> None:
    await queue(transport, ns)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    await transport.enqueue(f"{ns}.work.a", b"x")
    (first,) = await work.wait_for(1)
    naked = time.monotonic()
    await first.nak(delay=0.3)
    await work.assert_quiet(0.15)
    second = (await work.wait_for(2))[1]
    assert time.monotonic() - naked >= 0.25
    assert second.num_delivered == 2
    await second.ack()


async def test_unsettled_work_is_redelivered_after_ack_wait(transport: Transport, ns: str) -> None:
    await queue(transport, ns, ack_wait=0.2)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    delivered = time.monotonic()
    await transport.enqueue(f"{ns}.work.a", b"x")
    first, second = await work.wait_for(2)
    assert time.monotonic() - delivered >= 0.15
    assert (first.num_delivered, second.num_delivered) == (1, 2)
    assert second.data == b"x"
    await second.ack()


async def test_in_progress_restarts_ack_wait(transport: Transport, ns: str) -> None:
    await queue(transport, ns, ack_wait=0.2)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    await transport.enqueue(f"{ns}.work.a", b"x")
    (first,) = await work.wait_for(1)
    for _ in range(4):  # 0.4 s of work, twice ack_wait, reporting progress
        await anyio.sleep(0.1)
        await first.in_progress()
    assert len(work.items) == 1
    second = (await work.wait_for(2))[1]  # progress reports stopped: redelivered
    assert second.num_delivered == 2
    await second.ack()


async def test_max_deliver_drops_the_message(transport: Transport, ns: str) -> None:
    await queue(transport, ns, max_deliver=2)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    await transport.enqueue(f"{ns}.work.a", b"poison")
    (first,) = await work.wait_for(1)
    await first.nak()
    second = (await work.wait_for(2))[1]
    assert second.num_delivered == 2
    await second.nak()
    await work.assert_quiet()
    await transport.enqueue(f"{ns}.work.a", b"next")  # the queue goes on
    later = (await work.wait_for(3))[2]
    assert (later.data, later.num_delivered) == (b"next", 1)
    await later.ack()


async def test_term_stops_redelivery(transport: Transport, ns: str) -> None:
    await queue(transport, ns, ack_wait=0.2)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    await transport.enqueue(f"{ns}.work.a", b"x")
    (first,) = await work.wait_for(1)
    await first.term()
    await work.assert_quiet(0.3)  # past ack_wait


async def test_enqueue_on_a_subject_no_queue_captures_fails(transport: Transport, ns: str) -> None:
    await queue(transport, ns)
    with pytest.raises(TransportError, match="no queue captures"):
        await transport.enqueue(f"{ns}.elsewhere", b"x", msg_id="lost")
    assert await transport.enqueue(f"{ns}.work.a", b"x", msg_id="kept") is True  # still works


async def test_duplicate_msg_id_is_dropped(transport: Transport, ns: str) -> None:
    await queue(transport, ns)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    # enqueue says whether it stored the message (False: a duplicate, dropped).
    assert await transport.enqueue(f"{ns}.work.a", b"1", msg_id="one") is True
    assert await transport.enqueue(f"{ns}.work.a", b"1 again", msg_id="one") is False
    assert await transport.enqueue(f"{ns}.work.a", b"2", msg_id="two") is True
    assert await transport.enqueue(f"{ns}.work.a", b"3") is True
    assert await transport.enqueue(f"{ns}.work.a", b"3") is True  # no msg_id: no deduplication
    received = await work.wait_for(4)
    assert payloads(received) == [b"1", b"2", b"3", b"3"]
    for msg in received:
        await msg.ack()
    # Still in the window:
    assert await transport.enqueue(f"{ns}.work.a", b"1 after ack", msg_id="one") is False
    await work.assert_quiet()


async def test_consumers_of_one_durable_share_its_messages(transport: Transport, ns: str) -> None:
    await queue(transport, ns)
    work = Recorder[tuple[str, WorkMsg]]()
    for name in ("first", "second"):
        await transport.consume(
            f"Q_{ns}",
            "workers",
            f"{ns}.work.>",
            tagged(work, name),
            max_in_flight=1,
        )
    sent = [b"%d" % i for i in range(12)]
    await transport.enqueue(f"{ns}.work.a", sent[0])
    await transport.enqueue(f"{ns}.work.a", sent[1])
    # Neither may hold two unsettled messages, so each got one.
    first_two = await work.wait_for(2)
    assert sorted(name for name, _ in first_two) == ["first", "second"]

    for data in sent[2:]:
        await transport.enqueue(f"{ns}.work.a", data)
    for i in range(12):  # settle the oldest unsettled one: the other consumer stays busy
        _, msg = (await work.wait_for(i + 1))[i]
        await msg.ack()
    await work.assert_quiet()
    assert sorted(msg.data for _, msg in work.items) == sorted(sent)


async def test_max_in_flight_bounds_unsettled_deliveries(transport: Transport, ns: str) -> None:
    await queue(transport, ns)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work, max_in_flight=3)
    sent = [b"%d" % i for i in range(10)]
    for data in sent:
        await transport.enqueue(f"{ns}.work.a", data)
    await work.wait_for(3)
    await work.assert_quiet()
    await work.items[0].ack()  # frees one slot: one more comes
    await work.wait_for(4)
    await work.assert_quiet()
    for acked in range(1, 10):
        await work.wait_for(min(acked + 3, 10))
        assert len(work.items) - acked <= 3
        await work.items[acked].ack()
    await work.assert_quiet()
    assert sorted(payloads(work.items)) == sorted(sent)


async def test_stopped_consumer_leaves_its_work_to_others(transport: Transport, ns: str) -> None:
    await queue(transport, ns, ack_wait=0.2)
    leaving = Recorder[WorkMsg]()
    consumer = await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", leaving)
    await transport.enqueue(f"{ns}.work.a", b"unfinished")
    await leaving.wait_for(1)
    await consumer.stop()
    await consumer.stop()  # again: nothing happens
    await transport.enqueue(f"{ns}.work.a", b"new")  # waits for a consumer

    staying = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", staying)
    # Settle each as it comes: "new" arrives at once, "unfinished" after its ack_wait, which
    # is just before the ack_wait of "new" runs out too (only a round trip or so later).
    for i in range(2):
        await (await staying.wait_for(i + 1))[i].ack()
    received = staying.items[:2]
    assert sorted(payloads(received)) == [b"new", b"unfinished"]
    assert {m.data: m.num_delivered for m in received} == {b"new": 1, b"unfinished": 2}
    await staying.assert_quiet()
    assert len(leaving.items) == 1


async def test_ensure_queue_is_idempotent(transport: Transport, ns: str) -> None:
    config = await queue(transport, ns)
    await transport.enqueue(f"{ns}.work.a", b"kept")
    await transport.ensure_queue(config)
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "workers", f"{ns}.work.>", work)
    (msg,) = await work.wait_for(1)
    assert msg.data == b"kept"
    await msg.ack()


async def test_queues_and_durables_must_not_overlap(transport: Transport, ns: str) -> None:
    config = await queue(transport, ns)
    with pytest.raises(TransportError):
        await transport.ensure_queue(QueueConfig(f"Other_{ns}", (f"{ns}.work.step.*",)))
    await transport.ensure_queue(dataclasses.replace(config, max_deliver=3))  # may change
    work = Recorder[WorkMsg]()
    await transport.consume(f"Q_{ns}", "steps", f"{ns}.work.step.*", work)
    with pytest.raises(TransportError):  # a work queue gives each message to one durable
        await transport.consume(f"Q_{ns}", "all", f"{ns}.work.>", work)
    with pytest.raises(TransportError):  # one durable, one filter
        await transport.consume(f"Q_{ns}", "steps", f"{ns}.work.other.*", work)
    with pytest.raises(TransportError):  # outside the queue's subjects
        await transport.consume(f"Q_{ns}", "else", f"{ns}.elsewhere.>", work)


# --- key-value --------------------------------------------------------------------------------


async def test_kv_put_get_and_keys(transport: Transport, ns: str) -> None:
    kv = await transport.open_kv(f"kv_{ns}")
    assert await kv.get("missing") is None
    assert await kv.keys() == []
    first = await kv.put("tx.1", b"a")
    assert await kv.get("tx.1") == Entry("tx.1", b"a", first)
    second = await kv.put("tx.1", b"b")
    assert second > first
    assert await kv.get("tx.1") == Entry("tx.1", b"b", second)
    await kv.put("tx.2", b"c")
    assert sorted(await kv.keys()) == ["tx.1", "tx.2"]


async def test_kv_create_refuses_an_existing_key(transport: Transport, ns: str) -> None:
    kv = await transport.open_kv(f"kv_{ns}")
    revision = await kv.create("lease", b"me")
    with pytest.raises(KeyExistsError):
        await kv.create("lease", b"you")
    assert await kv.get("lease") == Entry("lease", b"me", revision)


async def test_kv_update_is_compare_and_set(transport: Transport, ns: str) -> None:
    kv = await transport.open_kv(f"kv_{ns}")
    revision = await kv.create("k", b"1")
    newer = await kv.update("k", b"2", revision)
    assert newer > revision
    with pytest.raises(RevisionMismatchError):
        await kv.update("k", b"stale", revision)
    assert await kv.get("k") == Entry("k", b"2", newer)
    with pytest.raises(RevisionMismatchError):
        await kv.update("absent", b"x", 0)
    assert await kv.get("absent") is None


async def test_kv_delete(transport: Transport, ns: str) -> None:
    kv = await transport.open_kv(f"kv_{ns}")
    revision = await kv.put("k", b"1")
    with pytest.raises(RevisionMismatchError):
        await kv.delete("k", last_revision=revision + 1000)
    assert await kv.get("k") is not None
    await kv.delete("k", last_revision=revision)
    assert await kv.get("k") is None
    assert await kv.keys() == []
    await kv.delete("k")  # absent: nothing happens
    with pytest.raises(RevisionMismatchError):
        await kv.delete("k", last_revision=revision)
    again = await kv.create("k", b"2")  # a deleted key may be created again
    assert await kv.get("k") == Entry("k", b"2", again)
    await kv.delete("k")
    assert await kv.get("k") is None


async def test_kv_rejects_invalid_keys(transport: Transport, ns: str) -> None:
    kv = await transport.open_kv(f"kv_{ns}")
    for key in ("", "a b", ".a", "a.", "a*", "a>"):
        with pytest.raises(ValueError, match="invalid key"):
            await kv.put(key, b"x")


async def test_kv_open_twice_is_idempotent(transport: Transport, ns: str) -> None:
    kv = await transport.open_kv(f"kv_{ns}")
    revision = await kv.put("k", b"v")
    again = await transport.open_kv(f"kv_{ns}")
    assert await again.get("k") == Entry("k", b"v", revision)
    other = await transport.open_kv(f"kv2_{ns}")
    assert await other.get("k") is None


async def test_kv_ttl_expires_keys_not_written_for_ttl(transport: Transport, ns: str) -> None:
    # Whole seconds, as NATS counts ttls; only lower bounds on when keys vanish, as NATS may
    # remove expired keys late.
    kv = await transport.open_kv(f"kv_{ns}")
    by_bucket = await transport.open_kv(f"kvttl_{ns}", ttl=1.0)
    started = time.monotonic()
    await kv.create("short", b"x", ttl=1.0)
    lease = await kv.create("lease", b"x", ttl=1.0)
    await kv.put("forever", b"x")
    await by_bucket.put("k", b"x")
    assert await kv.get("short") is not None

    await anyio.sleep(0.5)
    await kv.update("lease", b"renewed", lease)  # keeps the ttl and restarts its countdown
    with anyio.fail_after(5):
        await expired(kv, "short")
        assert time.monotonic() - started >= 0.9
        await expired(by_bucket, "k")
        await expired(kv, "lease")
        assert time.monotonic() - started >= 1.4
    assert await kv.keys() == ["forever"]
    assert await by_bucket.keys() == []
    await kv.create("short", b"again")  # an expired key may be created again


async def test_kv_put_keeps_the_key_ttl(transport: Transport, ns: str) -> None:
    kv = await transport.open_kv(f"kv_{ns}")
    other = await transport.open_kv(f"kv_{ns}")  # a second handle on the same bucket
    started = time.monotonic()
    await kv.create("by-same", b"x", ttl=1.0)
    await kv.create("by-other", b"x", ttl=1.0)
    await kv.put("by-same", b"y")
    await other.put("by-other", b"y")
    with anyio.fail_after(5):
        await expired(kv, "by-same")
        await expired(kv, "by-other")
    assert time.monotonic() - started >= 0.9
    await kv.put("by-same", b"z")  # an expired key may be written again
    assert await kv.get("by-same") is not None


async def test_replicas_is_a_creation_setting_from_one_to_five(
    transport: Transport, ns: str
) -> None:
    # One server (or one process) keeps one copy; a NATS cluster test asks for three.
    await transport.ensure_queue(QueueConfig(f"Q{ns}", (f"{ns}.q.*",), replicas=1))
    await transport.enqueue(f"{ns}.q.a", b"1")
    received = Recorder[WorkMsg]()
    await transport.consume(f"Q{ns}", "d", f"{ns}.q.*", received)
    (msg,) = await received.wait_for(1)
    await msg.ack()
    kv = await transport.open_kv(f"kv_{ns}", replicas=1)
    revision = await kv.put("k", b"v")
    assert await kv.get("k") == Entry("k", b"v", revision)
    await transport.ensure_log(f"L{ns}", (f"{ns}.log.>",), max_age=60, replicas=1)
    for wrong in (0, 6, True):
        with pytest.raises(ValueError, match="replicas"):
            QueueConfig(f"Q{ns}", (f"{ns}.q.*",), replicas=wrong)
        with pytest.raises(ValueError, match="replicas"):
            await transport.open_kv(f"kv_{ns}", replicas=wrong)
    with pytest.raises(ValueError, match="replicas"):
        await transport.ensure_log(f"L{ns}", (f"{ns}.log.>",), max_age=60, replicas=0)


async def test_a_log_may_be_kept_in_memory_when_bounded(transport: Transport, ns: str) -> None:
    await transport.ensure_log(f"M{ns}", (f"{ns}.mem.>",), max_age=60, memory=True, max_bytes=4096)
    await transport.ensure_log(f"M{ns}", (f"{ns}.mem.>",), max_age=60, memory=True, max_bytes=8192)
    got = Recorder[Msg]()
    await transport.subscribe(f"{ns}.mem.>", got)
    await transport.publish(f"{ns}.mem.a", b"kept for a while")
    assert payloads(await got.wait_for(1)) == [b"kept for a while"]
    with pytest.raises(ValueError, match="needs max_bytes"):
        await transport.ensure_log(f"N{ns}", (f"{ns}.mem2.>",), max_age=60, memory=True)
    for wrong in (0, -1, True):
        with pytest.raises(ValueError, match="max_bytes"):
            await transport.ensure_log(f"N{ns}", (f"{ns}.mem2.>",), max_age=60, max_bytes=wrong)
