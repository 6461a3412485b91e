"""API starts run in the coordinator's process when its partition is ours (no trip through the
work queue), and take the queue when that cannot be done: the start is never lost, never run
twice, and the reply says whether it was fresh."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from actors import KvStore, StartWorkflow, Store
from actors.protocol import StartRequest
from orchestrator import (
    TransactionNotFoundError,
    TransactionState,
    create_step,
    create_workflow,
)
from orchestrator._client import Client
from orchestrator._codec import encode
from orchestrator._transaction import TxState
from orchestrator.services import Coordinator, Worker
from transport import MemoryTransport, TransportError

pytestmark = pytest.mark.anyio

runs: list[str] = []


async def _note(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
    runs.append(ctx.transaction_id)
    return {"n": data["n"] + 1}


note = create_step("as-note", _note)
flow = create_workflow("as-flow", lambda inp: note(inp))


class _FailingSaves(KvStore):
    """A key-value store whose first ``failures`` checkpoint writes fail (NATS away)."""

    def __init__(self, transport: MemoryTransport, failures: int) -> None:
        super().__init__(transport, prefix="as")
        self.failures = failures

    async def save(self, state: TxState) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise TransportError("the store is unavailable (injected)")
        await super().save(state)


@contextlib.asynccontextmanager
async def _services(store: Store | None = None) -> AsyncIterator[tuple[Client, Coordinator]]:
    transport = MemoryTransport()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(transport)
        if isinstance(store, KvStore):
            store.transport = transport
        coordinator = await stack.enter_async_context(
            Coordinator([flow], transport=transport, prefix="as", store=store)
        )
        await stack.enter_async_context(Worker([flow], transport=transport, prefix="as"))
        client = await stack.enter_async_context(
            Client(transport, prefix="as", owns_transport=False)
        )
        assert coordinator.leases is not None
        await coordinator.leases.wait_owned(timeout=10)  # every partition is ours
        yield client, coordinator


async def _start(client: Client, tx: str) -> bool:
    """An API start; whether the reply says it was a duplicate."""
    request = StartRequest(workflow="as-flow", transaction_id=tx, input={"n": 1}, context={})
    answer = await client._call("start", request)
    assert answer.transaction_id == tx
    return answer.duplicate


async def test_an_api_start_runs_in_process_and_says_whether_it_was_fresh() -> None:
    runs.clear()
    async with _services() as (client, coordinator):
        host = coordinator.host
        assert host is not None
        start = StartWorkflow(workflow="as-flow", transaction_id="as-1", input=encode({"n": 1}))
        assert await host.start_here(start, timeout=5) is True  # its first turn is persisted
        assert (await client.get("as-1")).state is not TransactionState.NOT_STARTED
        with anyio.fail_after(10):
            result = await client.wait("as-1")
        assert await host.start_here(start, timeout=5) is False  # a duplicate: attached
        assert await _start(client, "as-1") is True  # the API says so
        again = await client.run("as-flow", {"n": 1}, transaction_id="as-1")
    assert result.state is TransactionState.DONE
    assert again.result == result.result == {"n": 2}
    assert runs == ["as-1"]


async def test_an_api_start_whose_first_turn_fails_takes_the_queue() -> None:
    # The checkpoint write fails: the actor hands the start back, the gateway puts it on the
    # work queue, and it runs from there, once.
    runs.clear()
    store = _FailingSaves(MemoryTransport(), failures=1)
    async with _services(store) as (client, _):
        assert await _start(client, "as-2") is False
        with anyio.fail_after(10):
            while True:  # through the queue: it begins a moment after the reply
                try:
                    result = await client.wait("as-2")
                    break
                except TransactionNotFoundError:
                    await anyio.sleep(0.01)
    assert store.failures == 0
    assert result.state is TransactionState.DONE
    assert result.result == {"n": 2}
    assert runs == ["as-2"]


class _CountedStarts(KvStore):
    """A key-value store that counts the reads of starting transactions."""

    def __init__(self, transport: MemoryTransport) -> None:
        super().__init__(transport, prefix="as")
        self.start_reads: list[str] = []

    async def load_start(self, transaction_id: str) -> TxState | None:
        self.start_reads.append(transaction_id)
        return await super().load_start(transaction_id)


async def test_a_run_is_one_request_and_a_named_id_is_looked_up_first() -> None:
    # `run` without an id: the gateway names the transaction (so it need not look for an
    # earlier run of it) and answers with the outcome. With an id, the start reads the store
    # first (an earlier run of that id is attached to, never run again).
    runs.clear()
    store = _CountedStarts(MemoryTransport())
    async with _services(store) as (client, _):
        with anyio.fail_after(10):
            fresh = await client.run("as-flow", {"n": 1})
            named = await client.run("as-flow", {"n": 5}, transaction_id="as-3")
            again = await client.run("as-flow", {"n": 5}, transaction_id="as-3")
    assert (fresh.state, fresh.result) == (TransactionState.DONE, {"n": 2})
    assert (named.result, again.result) == ({"n": 6}, {"n": 6})
    assert runs == [fresh.transaction_id, "as-3"]
    assert store.start_reads == ["as-3", "as-3"]


async def _slow(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
    await anyio.sleep(0.3)  # longer than the client's recheck below: the answer has no result
    return {"n": data["n"] + 1}


slow_note = create_step("as-slow", _slow)
slow_flow = create_workflow("as-slow-flow", lambda inp: slow_note(inp))


async def test_a_run_that_outlasts_the_wait_is_followed_by_its_events() -> None:
    transport = MemoryTransport()
    async with (
        transport,
        Coordinator([slow_flow], transport=transport, prefix="sl") as coordinator,
        Worker([slow_flow], transport=transport, prefix="sl"),
        Client(transport, prefix="sl", owns_transport=False, recheck=0.05) as client,
    ):
        assert coordinator.leases is not None
        await coordinator.leases.wait_owned(timeout=10)
        with anyio.fail_after(10):
            result = await client.run("as-slow-flow", {"n": 1})
    assert (result.state, result.result) == (TransactionState.DONE, {"n": 2})
