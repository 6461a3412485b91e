"""Step results go straight from the worker to the coordinator that owns the transaction (a
core request on the partition's result subject, answered once the result is applied and
persisted), and take the work queue whenever that does not work: never lost, never applied
twice."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest

from actors import KvStore, StepCommand, Subjects, TxEvent, decode_message, encode_message
from orchestrator import TransactionState, create_step, create_workflow
from orchestrator._client import Client
from orchestrator._codec import encode
from orchestrator._transaction import StepDone, StepRecord, new_state
from orchestrator.services import Coordinator, Worker
from transport import MemoryTransport, Msg, NatsServer, NatsTransport, Transport, WorkMsg

pytestmark = pytest.mark.anyio

calls: list[str] = []


async def _add(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
    calls.append(f"{ctx.transaction_id}:{ctx.step_name}")
    return {"n": data["n"] + 1}


async def _fail(data: dict[str, Any], ctx: Any) -> None:
    raise ValueError("no")


async def _undo(data: Any, ctx: Any) -> None:
    calls.append(f"{ctx.transaction_id}:undo")


one = create_step("dr-one", _add, _undo)
two = create_step("dr-two", _add)
bad = create_step("dr-bad", _fail)
good_flow = create_workflow("dr-good", lambda inp: two(one(inp)))
bad_flow = create_workflow("dr-bad", lambda inp: bad(one(inp)))


class _Enqueues:
    """Records the subjects a transport enqueues on (and otherwise is the real transport)."""

    enqueued: list[str]

    async def enqueue(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> bool:
        self.enqueued.append(subject)
        stored: bool = await super().enqueue(  # type: ignore[misc]
            subject, data, headers=headers, msg_id=msg_id
        )
        return stored


class _Memory(_Enqueues, MemoryTransport):
    pass


class _Nats(_Enqueues, NatsTransport):
    url: str


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def worker_transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    """The worker's transport (a fresh memory one, or a connection to the test nats-server),
    recording what it enqueues."""
    transport: _Memory | _Nats
    if request.param == "memory":
        transport = _Memory()
    else:
        server: NatsServer = request.getfixturevalue("nats_server")
        transport = _Nats(server.url, name="direct-results-worker")
        transport.url = server.url
    transport.enqueued = []
    async with transport:
        yield transport


@contextlib.asynccontextmanager
async def _services(worker_transport: Transport, prefix: str) -> AsyncIterator[Client]:
    """A coordinator and a client on their own transport, a worker on ``worker_transport``
    (one memory transport for all three when it is one)."""
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(worker_transport, MemoryTransport):
            transport: Transport = worker_transport
        else:
            assert isinstance(worker_transport, _Nats)
            transport = await stack.enter_async_context(
                NatsTransport(worker_transport.url, name="direct-results")
            )
        flows = [good_flow, bad_flow]
        coordinator = await stack.enter_async_context(
            Coordinator(flows, transport=transport, prefix=prefix)
        )
        assert coordinator.leases is not None
        await coordinator.leases.wait_owned(timeout=10)
        await stack.enter_async_context(Worker(flows, transport=worker_transport, prefix=prefix))
        yield await stack.enter_async_context(
            Client(transport, prefix=prefix, owns_transport=False)
        )


async def test_results_go_straight_to_the_coordinator(worker_transport: Any) -> None:
    calls.clear()
    prefix = f"dr{uuid.uuid4().hex[:8]}"
    async with _services(worker_transport, prefix) as client:
        with anyio.fail_after(30):
            good = [await client.run("dr-good", {"n": i}, transaction_id=f"g{i}") for i in range(5)]
            failed = await client.run("dr-bad", {"n": 0}, transaction_id="b0", throw_on_error=False)
    assert [r.state for r in good] == [TransactionState.DONE] * 5
    assert [r.result for r in good] == [{"n": i + 2} for i in range(5)]
    assert failed.state is TransactionState.REVERTED
    assert sorted(calls) == sorted(
        [f"g{i}:dr-{s}" for i in range(5) for s in ("one", "two")] + ["b0:dr-one", "b0:undo"]
    )
    # Every result (13 of them) was taken straight away: none went to a partition's queue.
    assert [s for s in worker_transport.enqueued if s.startswith(f"{prefix}.tx.")] == []


def _command(subjects: Subjects, direct: str | None) -> StepCommand:
    return StepCommand(
        workflow="dr-good",
        transaction_id="t-1",
        step="dr-two",
        action="invoke",
        attempt=1,
        input=encode({"n": 1}),
        reply_subject=subjects.tx("t-1"),
        direct=direct,
    )


@pytest.mark.parametrize("answer", [None, b"-", b"?"])
async def test_a_result_not_taken_straight_away_takes_the_queue(
    worker_transport: Any, answer: bytes | None
) -> None:
    # Nobody takes the partition's results (None: no responders), or its owner says no ("-":
    # it no longer owns the partition, or its turn failed), or says something else.
    prefix = f"dr{uuid.uuid4().hex[:8]}"
    subjects = Subjects(prefix)
    direct = subjects.result(subjects.partition("t-1"))
    queued: list[WorkMsg] = []
    asked: list[Msg] = []
    arrived = anyio.Event()

    def on_queue(work: WorkMsg) -> None:
        queued.append(work)
        arrived.set()

    def owner(msg: Msg) -> None:
        asked.append(msg)
        assert msg.reply is not None
        assert answer is not None
        tasks.start_soon(worker_transport.publish, msg.reply, answer)

    async with (
        Worker([good_flow], transport=worker_transport, prefix=prefix),
        anyio.create_task_group() as tasks,
    ):
        if answer is not None:
            await worker_transport.subscribe(subjects.results, owner, queue="coordinators")
        await worker_transport.consume(subjects.work_queue, "test-tx", subjects.tx("t-1"), on_queue)
        await worker_transport.enqueue(
            subjects.step("dr-two"), encode_message(_command(subjects, direct))
        )
        with anyio.fail_after(10):
            await arrived.wait()
        tasks.cancel_scope.cancel()
    assert len(asked) == (0 if answer is None else 1)
    (work,) = queued
    result = decode_message(work.data)
    assert isinstance(result, TxEvent)
    assert isinstance(result.event, StepDone)
    assert [decode_message(m.data) for m in asked] == [result] * len(asked)  # the same answer
    assert (result.transaction_id, result.event.step, result.event.attempt) == ("t-1", "dr-two", 1)


@pytest.mark.parametrize("data", [b"\xc1garbage", encode_message(_command(Subjects(), None))])
async def test_what_is_not_a_step_result_is_refused_and_the_coordinator_keeps_serving(
    worker_transport: Any, data: bytes
) -> None:
    prefix = f"dr{uuid.uuid4().hex[:8]}"
    async with _services(worker_transport, prefix) as client:
        with anyio.fail_after(10):
            reply = await worker_transport.request(Subjects(prefix).result(0), data)
            result = await client.run("dr-good", {"n": 1})
    assert reply.data == b"-"  # the worker would put it on the queue, which says what is wrong
    assert result.state is TransactionState.DONE


async def test_a_command_stays_ours_while_its_answer_is_being_taken(worker_transport: Any) -> None:
    # The coordinator takes longer than the queue's ack_wait to answer (a slow turn, a cluster
    # failing over): the worker keeps reporting the command in progress, so it is not
    # delivered again (and run again, maybe after compensation began) meanwhile.
    calls.clear()
    prefix = f"dr{uuid.uuid4().hex[:8]}"
    subjects = Subjects(prefix)
    ack_wait = 0.3
    asked: list[Msg] = []
    answered = anyio.Event()

    async def answer_late(msg: Msg) -> None:
        await anyio.sleep(4 * ack_wait)  # the slow coordinator (not a wait for an event)
        assert msg.reply is not None
        await worker_transport.publish(msg.reply, b"+")
        answered.set()

    def owner(msg: Msg) -> None:
        asked.append(msg)
        tasks.start_soon(answer_late, msg)

    # The transaction waits for the step: a command delivered again would run again.
    store = KvStore(worker_transport, prefix=prefix)
    await store.open()
    waiting = new_state(good_flow.graph, "t-1")
    waiting.status = "invoking"
    waiting.steps["dr-two"] = StepRecord(state="invoking", attempt=1, running=True)
    await store.save(waiting)
    async with (
        Worker(
            [good_flow], transport=worker_transport, prefix=prefix, ack_wait=ack_wait, store=store
        ),
        anyio.create_task_group() as tasks,
    ):
        await worker_transport.subscribe(subjects.results, owner, queue="coordinators")
        await worker_transport.enqueue(
            subjects.step("dr-two"),
            encode_message(_command(subjects, subjects.result(subjects.partition("t-1")))),
        )
        with anyio.fail_after(10):
            await answered.wait()
        tasks.cancel_scope.cancel()
    assert calls == ["t-1:dr-two"]  # run once
    assert len(asked) == 1  # answered once: no second delivery
