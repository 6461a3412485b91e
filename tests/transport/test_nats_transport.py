"""What the NATS transport does beyond the contract: restarts, several connections, NATS layout.

The contract suite (``test_contract.py``) runs on NATS too; these tests cover what only a real
server has. Waits have deadlines; polling loops poll the server, which offers nothing to await.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

import anyio
import nats
import pytest
from nats.aio.client import Client

from transport import Msg, NatsServer, NatsTransport, QueueConfig, TransportError, WorkMsg

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

DEADLINE = 10.0
"""Seconds any wait here may take (a restart included) before the test fails."""

T = TypeVar("T")


class Received(Generic[T]):
    """A handler keeping what it gets; ``wait_for(n)`` waits (under DEADLINE) for n of them."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = anyio.Event()

    def __call__(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, count: int) -> list[T]:
        with anyio.fail_after(DEADLINE):
            while len(self.items) < count:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.items


@pytest.fixture
def ns() -> str:
    return f"n{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A plain nats-py connection, to look at what the transport left on the server."""
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server of this test's own, which it may restart."""
    with NatsServer(config="max_payload: 4096\n") as server:
        yield server


async def stream_messages(nc: Client, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.messages


async def test_queues_buckets_and_consumers_survive_a_server_restart(
    own_server: NatsServer, ns: str
) -> None:
    got = Received[WorkMsg]()
    reconnected = anyio.Event()

    async def on_reconnect() -> None:  # chained after the transport's own callback
        reconnected.set()

    async with NatsTransport(
        own_server.url,
        reconnect_time_wait=0.05,
        max_reconnect_attempts=-1,
        reconnected_cb=on_reconnect,
    ) as transport:
        await transport.ensure_queue(QueueConfig("WORK", ("work.>",)))
        await transport.consume("WORK", "workers", "work.>", got, max_in_flight=4)
        kv = await transport.open_kv("state")
        revision = await kv.put("k", b"before")
        await transport.enqueue("work.a", b"before")
        await (await got.wait_for(1))[0].ack()

        port = own_server.port
        own_server.restart()
        assert own_server.port == port

        with anyio.fail_after(DEADLINE):
            # A request sent before the client notices the restart is lost (and times out).
            await reconnected.wait()
            await transport.enqueue("work.a", b"after")
        after = (await got.wait_for(2))[1]  # the consumer pulled again after reconnecting
        assert after.data == b"after"
        await after.ack()
        entry = await kv.get("k")
        assert entry is not None
        assert (entry.value, entry.revision) == (b"before", revision)


async def test_server_config_text_applies(own_server: NatsServer) -> None:
    async with NatsTransport(own_server.url) as transport:
        await transport.publish("small", b"x" * 4096)
        with pytest.raises(TransportError):
            await transport.publish("big", b"x" * 4097)


async def test_exhausted_message_leaves_the_stream(
    transport_logs: pytest.LogCaptureFixture, nats_server: NatsServer, client: Client, ns: str
) -> None:
    got = Received[WorkMsg]()
    async with NatsTransport(nats_server.url) as transport:
        await transport.ensure_queue(QueueConfig(f"Q_{ns}", (f"{ns}.>",), max_deliver=2))
        await transport.consume(f"Q_{ns}", "w", f"{ns}.>", got)
        await transport.enqueue(f"{ns}.a", b"poison")
        for delivery in range(2):
            await (await got.wait_for(delivery + 1))[delivery].nak()
        # JetStream would keep it forever: the transport deletes it.
        with anyio.fail_after(DEADLINE):
            while await stream_messages(client, f"Q_{ns}"):  # noqa: ASYNC110 - polls the server
                await anyio.sleep(0.02)
    assert [m.num_delivered for m in got.items] == [1, 2]
    assert any("dropped message" in r.getMessage() for r in transport_logs.records)


async def test_ensure_queue_updates_existing_durables(
    nats_server: NatsServer, client: Client, ns: str
) -> None:
    config = QueueConfig(f"Q_{ns}", (f"{ns}.>",))
    async with NatsTransport(nats_server.url) as transport:
        await transport.ensure_queue(config)
        consumer = await transport.consume(f"Q_{ns}", "w", f"{ns}.>", lambda m: None)
        await consumer.stop()
        await transport.ensure_queue(dataclasses.replace(config, max_deliver=3, ack_wait=7.5))
    info = await client.jetstream().consumer_info(f"Q_{ns}", "w")
    assert (info.config.max_deliver, info.config.ack_wait) == (3, 7.5)


async def test_connections_share_a_durable(nats_server: NatsServer, ns: str) -> None:
    got = {"one": Received[WorkMsg](), "two": Received[WorkMsg]()}
    async with (
        NatsTransport(nats_server.url, name="one") as one,
        NatsTransport(nats_server.url, name="two") as two,
    ):
        await one.ensure_queue(QueueConfig(f"Q_{ns}", (f"{ns}.>",)))
        await one.consume(f"Q_{ns}", "w", f"{ns}.>", got["one"], max_in_flight=1)
        await two.consume(f"Q_{ns}", "w", f"{ns}.>", got["two"], max_in_flight=1)
        await one.enqueue(f"{ns}.a", b"1")
        await one.enqueue(f"{ns}.a", b"2")
        # Each connection holds at most one, so each got one.
        firsts = [(await received.wait_for(1))[0] for received in got.values()]
        assert sorted(m.data for m in firsts) == [b"1", b"2"]
        for msg in firsts:
            await msg.ack()


async def test_buckets_are_nats_key_value_buckets(
    nats_server: NatsServer, client: Client, ns: str
) -> None:
    async with NatsTransport(nats_server.url) as transport:
        kv = await transport.open_kv(f"kv_{ns}")
        revision = await kv.create("lease", b"me", ttl=2.5)
        await kv.put("plain", b"x")
        await kv.put("gone", b"x")
        await kv.delete("gone")

    theirs = await client.jetstream().key_value(f"kv_{ns}")
    entry = await theirs.get("lease")
    assert (entry.value, entry.revision) == (b"me", revision)
    assert sorted(await theirs.keys()) == ["lease", "plain"]
    raw = await client.jetstream().get_msg(f"KV_kv_{ns}", subject=f"$KV.kv_{ns}.lease")
    assert raw.headers is not None
    assert raw.headers["Nats-TTL"] == "3"  # whole seconds, rounded up


async def test_kv_update_by_another_connection_keeps_the_ttl(
    nats_server: NatsServer, client: Client, ns: str
) -> None:
    async with (
        NatsTransport(nats_server.url) as one,
        NatsTransport(nats_server.url) as two,
    ):
        mine = await one.open_kv(f"kv_{ns}")
        theirs = await two.open_kv(f"kv_{ns}")
        revision = await mine.create("lease", b"me", ttl=5)
        # The other connection never saw the key: it reads the ttl of that revision.
        revision = await theirs.update("lease", b"them", revision)
        await mine.put("lease", b"me again")  # its remembered revision is stale: reads again
    raw = await client.jetstream().get_msg(f"KV_kv_{ns}", subject=f"$KV.kv_{ns}.lease")
    assert raw.headers is not None
    assert (raw.data, raw.headers["Nats-TTL"]) == (b"me again", "5")


async def test_subscribers_get_messages_from_any_nats_client(
    nats_server: NatsServer, client: Client, ns: str
) -> None:
    got = Received[Msg]()
    async with NatsTransport(nats_server.url) as transport:
        await transport.subscribe(f"{ns}.x", got)  # returns once the server has it
        await client.publish(f"{ns}.x", json.dumps({"from": "nats-py"}).encode())
        await client.flush()  # the publisher's buffer is out, whatever its flusher task does
        (msg,) = await got.wait_for(1)
    assert json.loads(msg.data) == {"from": "nats-py"}


@pytest.fixture
def transport_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="transport")
    return caplog


async def test_handlers_run_as_messages_are_read_and_leave_nothing_behind(
    nats_server: NatsServer, client: Client, ns: str
) -> None:
    # Subscription handlers run in the connection's reading task (no task and queue of their
    # own); an unsubscribed one is forgotten, however many come and go (a client watches each
    # run it waits for).
    got = Received[Msg]()
    async with NatsTransport(nats_server.url) as transport:
        nc = transport.nats_client
        inline = nc._inline  # type: ignore[attr-defined]
        before = len(inline)
        for i in range(50):
            sub = await transport.subscribe(f"{ns}.run.{i}", got)
            await client.publish(f"{ns}.run.{i}", str(i).encode())
            await client.flush()
            await got.wait_for(i + 1)
            await sub.unsubscribe()
        assert len(inline) == before
        assert len(nc._subs) == before
    assert [m.data for m in got.items] == [str(i).encode() for i in range(50)]


async def test_a_subscription_is_on_the_wire_before_the_ping_that_confirms_it(
    nats_server: NatsServer, ns: str
) -> None:
    # `subscribe` returns once a PING sent after the SUB comes back: the PING must follow the
    # SUB on the wire (nats-py's own writes it ahead of commands still queued for its flusher).
    async with NatsTransport(nats_server.url) as transport:
        wire = transport.nats_client._transport
        assert wire is not None
        written: list[bytes] = []
        write, writelines = wire.write, wire.writelines

        def record(data: bytes) -> None:
            written.append(bytes(data))
            write(data)

        def record_lines(lines: list[bytes]) -> None:
            written.extend(bytes(line) for line in lines)
            writelines(lines)

        wire.write, wire.writelines = record, record_lines  # type: ignore[method-assign]
        try:
            await transport.subscribe(f"{ns}.confirmed", lambda msg: None)
        finally:
            wire.write, wire.writelines = write, writelines  # type: ignore[method-assign]
    stream = b"".join(written)
    assert stream.index(f"SUB {ns}.confirmed".encode()) < stream.index(b"PING\r\n"), stream


def test_the_server_runs_with_the_environment_it_is_given() -> None:
    from transport._nats_server import _free_port

    port = _free_port()
    with (
        NatsServer(config=f"http: 127.0.0.1:{port}\n", env={"GOMAXPROCS": "1"}),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as answer,
    ):
        varz = json.load(answer)
    assert varz["gomaxprocs"] == 1
