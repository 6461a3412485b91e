"""What the memory transport promises beyond the contract: inline, ordered, checked delivery."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport import MemoryTransport, Msg, QueueConfig, TransportError, WorkHandler, WorkMsg
from transport._subjects import collide, compile_pattern, matches

pytestmark = pytest.mark.anyio

WORK = QueueConfig("WORK", ("work.>", "tx.*"))


@pytest.fixture
async def memory() -> AsyncIterator[MemoryTransport]:
    async with MemoryTransport() as transport:
        yield transport


async def test_has_interest_follows_the_subscriptions(memory: MemoryTransport) -> None:
    subject = "orch.evt.wf.tx-1"
    await memory.subscribe("orch.api.*", lambda m: None)
    assert memory.has_interest(subject) is False
    assert memory.has_interest(subject) is False  # asked again: the same answer
    every = await memory.subscribe("orch.evt.wf.*", lambda m: None)
    assert memory.has_interest(subject) is True
    assert memory.has_interest("orch.evt.other.tx-1") is False
    await every.unsubscribe()
    assert memory.has_interest(subject) is False
    one = await memory.subscribe(subject, lambda m: None)
    assert memory.has_interest(subject) is True
    await one.unsubscribe()
    assert memory.has_interest(subject) is False


async def test_publish_calls_handlers_inline_in_order(memory: MemoryTransport) -> None:
    calls: list[str] = []
    await memory.subscribe("a.*", lambda m: calls.append("plain 1"))
    await memory.subscribe("a.b", lambda m: calls.append("group g1"), queue="g")
    await memory.subscribe("a.>", lambda m: calls.append("plain 2"))
    await memory.subscribe("a.b", lambda m: calls.append("group g2"), queue="g")
    await memory.publish("a.b", b"1")
    assert calls == ["plain 1", "plain 2", "group g1"]
    await memory.publish("a.b", b"2")
    assert calls[3:] == ["plain 1", "plain 2", "group g2"]
    await memory.publish("a.b", b"3")
    assert calls[6:] == ["plain 1", "plain 2", "group g1"]


async def test_new_subscription_sees_cached_subjects(memory: MemoryTransport) -> None:
    got: list[Msg] = []
    await memory.publish("a.b", b"before")  # caches the (empty) route of a.b
    await memory.subscribe("a.>", got.append)
    await memory.publish("a.b", b"after")
    assert [m.data for m in got] == [b"after"]


async def test_failing_handlers_are_logged(
    memory: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(msg: object) -> None:
        raise RuntimeError("boom")

    await memory.subscribe("a", fail)
    await memory.ensure_queue(WORK)
    await memory.consume("WORK", "w", "work.>", fail)
    with caplog.at_level(logging.ERROR, logger="transport"):
        await memory.publish("a", b"x")
        await memory.enqueue("work.x", b"x")
    failures = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert len(failures) == 2
    assert all(isinstance(e, RuntimeError) for e in failures)


async def test_enqueue_and_ack_deliver_inline(memory: MemoryTransport) -> None:
    await memory.ensure_queue(WORK)
    got: list[WorkMsg] = []
    await memory.consume("WORK", "w", "work.>", got.append, max_in_flight=1)
    await memory.enqueue("work.a", b"1")
    await memory.enqueue("work.a", b"2")
    assert [m.data for m in got] == [b"1"]
    await got[0].ack()
    assert [m.data for m in got] == [b"1", b"2"]


async def test_consumers_of_a_durable_take_turns(memory: MemoryTransport) -> None:
    await memory.ensure_queue(WORK)
    got: list[tuple[str, bytes]] = []

    def consumer(name: str) -> WorkHandler:
        return lambda msg: got.append((name, msg.data))

    for name in ("a", "b", "c"):
        await memory.consume("WORK", "w", "work.>", consumer(name))
    for i in range(6):
        await memory.enqueue("work.x", b"%d" % i)
    assert [name for name, _ in got] == ["a", "b", "c", "a", "b", "c"]


async def test_each_durable_gets_its_subjects(memory: MemoryTransport) -> None:
    await memory.ensure_queue(WORK)
    await memory.enqueue("tx.1", b"early")  # no durable for it yet: kept
    steps: list[WorkMsg] = []
    txs: list[WorkMsg] = []
    await memory.consume("WORK", "steps", "work.>", steps.append)
    await memory.consume("WORK", "tx", "tx.*", txs.append)
    await memory.enqueue("work.a", b"s")
    await memory.enqueue("tx.2", b"t")
    assert [m.data for m in steps] == [b"s"]
    assert [m.data for m in txs] == [b"early", b"t"]


async def test_redeliveries_come_before_new_messages(memory: MemoryTransport) -> None:
    await memory.ensure_queue(WORK)
    got: list[WorkMsg] = []
    await memory.consume("WORK", "w", "work.>", got.append, max_in_flight=1)
    await memory.enqueue("work.a", b"1")
    await memory.enqueue("work.a", b"2")
    await got[0].nak()
    assert [(m.data, m.num_delivered) for m in got] == [(b"1", 1), (b"1", 2)]


async def test_dropped_messages_are_counted(memory: MemoryTransport) -> None:
    await memory.ensure_queue(QueueConfig("Q", ("q.>",), max_deliver=2, ack_wait=0.05))
    got: list[WorkMsg] = []
    await memory.consume("Q", "w", "q.>", got.append)
    await memory.enqueue("q.nak", b"n")
    await got[0].nak()
    await got[1].nak()
    assert memory.dropped_count("Q") == 1
    await memory.enqueue("q.timeout", b"t")  # never settled: ack_wait runs out twice
    with anyio.fail_after(5):
        while memory.dropped_count("Q") < 2:  # noqa: ASYNC110 - a counter, no event to wait on
            await anyio.sleep(0.01)
    assert [(m.data, m.num_delivered) for m in got] == [(b"n", 1), (b"n", 2), (b"t", 1), (b"t", 2)]
    with pytest.raises(TransportError):
        memory.dropped_count("nope")


async def test_ack_of_an_earlier_delivery_settles_the_message(memory: MemoryTransport) -> None:
    await memory.ensure_queue(QueueConfig("Q", ("q.>",), ack_wait=0.05))
    got: list[WorkMsg] = []
    await memory.consume("Q", "w", "q.>", got.append, max_in_flight=1)
    await memory.enqueue("q.a", b"slow")
    await memory.enqueue("q.a", b"next")
    with anyio.fail_after(5):
        while len(got) < 2:  # noqa: ASYNC110 - the handler appends, no event to wait on
            await anyio.sleep(0.01)
    assert [(m.data, m.num_delivered) for m in got] == [(b"slow", 1), (b"slow", 2)]
    await got[0].ack()  # the slow first handler finishes late: the message is done
    assert [m.data for m in got[2:]] == [b"next"]  # and its current delivery's slot freed
    await got[1].nak()  # superseded: does nothing
    assert len(got) == 3


async def test_a_tight_publish_loop_lets_other_tasks_run(memory: MemoryTransport) -> None:
    ran = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_set, ran)
        for _ in range(200):
            await memory.publish("nobody.listens", b"")
            if ran.is_set():
                break
        assert ran.is_set()


async def _set(event: anyio.Event) -> None:
    event.set()


async def test_kv_ttl_is_kept_across_writes(memory: MemoryTransport) -> None:
    kv = await memory.open_kv("b")
    await kv.create("k", b"1", ttl=0.1)
    await kv.put("k", b"2")  # keeps the ttl
    with anyio.fail_after(5):
        while await kv.get("k") is not None:  # noqa: ASYNC110 - buckets have no notification
            await anyio.sleep(0.01)
    await kv.put("k", b"3")  # absent, so no ttl any more
    with anyio.move_on_after(0.15):
        while await kv.get("k") is not None:  # noqa: ASYNC110 - as above
            await anyio.sleep(0.01)
    assert await kv.get("k") is not None


async def test_bad_arguments_are_refused(memory: MemoryTransport) -> None:
    noop = lambda msg: None  # noqa: E731 - a handler that is never called
    for pattern in ("", "a..b", "a.>.b", "a b"):
        with pytest.raises(ValueError, match="invalid subject pattern"):
            await memory.subscribe(pattern, noop)
    for subject in ("a.*", "a.>", "a..b"):
        with pytest.raises(ValueError, match="invalid subject"):
            await memory.publish(subject, b"")
    with pytest.raises(ValueError, match="invalid bucket name"):
        await memory.open_kv("a.b")
    with pytest.raises(ValueError, match="history"):
        await memory.open_kv("b", history=0)
    await memory.ensure_queue(WORK)
    with pytest.raises(ValueError, match="invalid durable name"):
        await memory.consume("WORK", "a.b", "work.>", noop)
    with pytest.raises(ValueError, match="max_in_flight"):
        await memory.consume("WORK", "w", "work.>", noop, max_in_flight=0)


@pytest.mark.parametrize(
    "settings",
    [
        {"name": "a.b", "subjects": ("x",)},
        {"name": "Q", "subjects": ()},
        {"name": "Q", "subjects": "x.>"},
        {"name": "Q", "subjects": ("x..y",)},
        {"name": "Q", "subjects": ("x",), "max_deliver": 0},
        {"name": "Q", "subjects": ("x",), "ack_wait": 0},
        {"name": "Q", "subjects": ("x",), "duplicate_window": -1},
    ],
)
def test_queue_config_is_validated(settings: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        QueueConfig(**settings)  # type: ignore[arg-type]


def test_can_be_made_outside_an_event_loop() -> None:
    assert repr(MemoryTransport()) == "<MemoryTransport new>"


async def test_use_outside_async_with_is_refused() -> None:
    transport = MemoryTransport()
    with pytest.raises(TransportError, match="not open"):
        await transport.publish("a", b"")
    async with transport:
        await transport.publish("a", b"")
    with pytest.raises(TransportError, match="closed"):
        await transport.enqueue("a", b"")
    with pytest.raises(TransportError, match="only once"):
        await transport.__aenter__()


TOKEN = st.sampled_from(["a", "b"])
PATTERN_TOKEN = st.sampled_from(["a", "b", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> tuple[str, ...]:
    tokens = draw(st.lists(PATTERN_TOKEN, min_size=1, max_size=4))
    if draw(st.booleans()):
        tokens[-1] = ">"
    return tuple(tokens)


def regex(pattern: tuple[str, ...]) -> re.Pattern[str]:
    parts = {"*": r"[^.]+", ">": r".+"}
    return re.compile(r"\.".join(parts.get(t, re.escape(t)) for t in pattern))


@given(patterns(), st.lists(TOKEN, min_size=1, max_size=5))
def test_matches_agrees_with_a_regex(pattern: tuple[str, ...], subject: list[str]) -> None:
    assert compile_pattern(".".join(pattern)) == pattern
    assert matches(pattern, subject) == bool(regex(pattern).fullmatch(".".join(subject)))


@given(patterns(), patterns())
def test_collide_finds_a_common_subject(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    # A common subject, if any, exists among short subjects over the patterns' tokens and "c".
    longest = max(len(a), len(b))
    candidates = [["a"], ["b"], ["c"]]
    subjects = list(candidates)
    for _ in range(longest - 1):
        candidates = [[*c, t] for c in candidates for t in ("a", "b", "c")]
        subjects += candidates
    common = any(matches(a, s) and matches(b, s) for s in subjects)
    assert collide(a, b) == collide(b, a) == common
