"""Resuming a transaction after its coordinator died (what a takeover does), from states a
crash can leave behind."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from actors import KvStore, MemoryStore, StartWorkflow
from orchestrator import LocalEngine, TransactionState, create_step, create_workflow
from orchestrator._codec import encode
from orchestrator._transaction import Begin, apply_all, new_state
from transport import MemoryTransport

pytestmark = pytest.mark.anyio


async def _double(data: dict[str, Any]) -> dict[str, Any]:
    return {"n": data["n"] * 2}


double = create_step("tk-double", _double)
child = create_workflow("tk-child", lambda inp: double(inp))
parent = create_workflow("tk-parent", lambda inp: child.run_as_step(input=inp))


async def _crashed_store(*, child_retired: bool) -> MemoryStore:
    """The states a crash leaves when a finished child's answer never reached its parent."""
    store = MemoryStore()
    async with LocalEngine([parent], store=store) as engine:
        done = await engine.run(parent, {"n": 21}, transaction_id="p-1")
    assert done.result == {"n": 42}
    state = await store.read("p-1")
    child_state = await store.read("p-1:tk-child-as-step")
    assert state is not None
    assert child_state is not None
    step = "tk-child-as-step"
    record = msgspec.structs.replace(
        state.steps[step], state="invoking", running=True, output=None, finished_at=None
    )
    crashed = MemoryStore()
    if child_retired:
        await crashed.finish(child_state, retention=3600)
    else:  # finished, persisted, not yet retired
        await crashed.save(child_state)
    await crashed.save(
        msgspec.structs.replace(
            state,
            status="invoking",
            result=None,
            finished_at=None,
            steps={**state.steps, step: record},
        )
    )
    return crashed


async def test_a_finished_child_left_live_answers_its_parent_when_resumed() -> None:
    # The child's coordinator persisted the child's finish and died before telling the parent:
    # whoever takes the child's partition over resumes it (it is still a live checkpoint).
    crashed = await _crashed_store(child_retired=False)
    async with LocalEngine([parent], store=crashed) as engine:
        host = engine._host
        host.route(host.resume_message("tk-child", "p-1:tk-child-as-step"), None)
        with anyio.fail_after(10):
            result = await engine.wait("p-1")
        live = [s.transaction_id for s in await crashed.live()]

    assert result.state is TransactionState.DONE
    assert result.result == {"n": 42}
    assert live == []  # the child was retired on the way


async def test_a_parent_whose_child_finished_unheard_completes_on_resume() -> None:
    # The child finished and was retired, its answer lost; the parent's checkpoint still has the
    # nested step running: resuming the parent starts the child again, which answers at once.
    crashed = await _crashed_store(child_retired=True)
    async with LocalEngine([parent], store=crashed) as engine:
        host = engine._host
        host.route(host.resume_message("tk-parent", "p-1"), None)  # as a takeover does
        with anyio.fail_after(10):
            result = await engine.wait("p-1")

    assert result.state is TransactionState.DONE
    assert result.result == {"n": 42}


async def _count(data: dict[str, Any], ctx: Any) -> dict[str, Any]:
    runs.append(ctx.attempt)
    return {"n": data["n"] + 1}


runs: list[int] = []
counted = create_step("tk-count", _count)
single = create_workflow("tk-single", lambda inp: counted(inp))


async def test_a_start_delivered_again_after_its_checkpoint_attaches_to_it() -> None:
    # A coordinator persisted a transaction's first checkpoint and died before acking the
    # start: the start comes again. The new coordinator expects a new transaction (it reads only
    # the retained copy); its first save conflicts with the checkpoint, it loads in full, and
    # the start attaches: the transaction runs once, from where it was.
    runs.clear()
    transport = MemoryTransport()
    store = KvStore(transport, prefix="again")
    graph = single.graph
    begun, _ = apply_all(
        graph, new_state(graph, "s-1"), [Begin(now=5.0, input=encode({"n": 1}))], now=5.0
    )
    async with LocalEngine([single], store=store, transport=transport) as engine:
        died = KvStore(transport, prefix="again")  # the coordinator that died
        await died.open()
        await died.save(begun)
        host = engine._host
        host.route(
            StartWorkflow(workflow="tk-single", transaction_id="s-1", input=encode({"n": 1})),
            None,
        )
        with anyio.fail_after(10):
            result = await engine.wait("s-1")

    assert result.state is TransactionState.DONE
    assert result.result == {"n": 2}
    assert result.created_at == 5.0  # the first run's, not begun again
    assert runs == [1]
