"""Resuming a transaction after its coordinator died (what a takeover does), from states a
crash can leave behind."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from actors import MemoryStore
from orchestrator import LocalEngine, TransactionState, create_step, create_workflow

pytestmark = pytest.mark.anyio


async def _double(data: dict[str, Any]) -> dict[str, Any]:
    return {"n": data["n"] * 2}


double = create_step("tk-double", _double)
child = create_workflow("tk-child", lambda inp: double(inp))
parent = create_workflow("tk-parent", lambda inp: child.run_as_step(input=inp))


async def test_a_parent_whose_child_finished_unheard_completes_on_resume() -> None:
    # The child finished, but its coordinator died before telling the parent (the child was
    # retired, its ChildFinished never sent); the parent's checkpoint still has the nested
    # step running.
    store = MemoryStore()
    async with LocalEngine([parent], store=store) as engine:
        done = await engine.run(parent, {"n": 21}, transaction_id="p-1")
    assert done.result == {"n": 42}
    state = await store.read("p-1")
    assert state is not None
    step = "tk-child-as-step"
    record = msgspec.structs.replace(
        state.steps[step], state="invoking", running=True, output=None, finished_at=None
    )
    crashed = MemoryStore()
    child_state = await store.read("p-1:tk-child-as-step")
    assert child_state is not None
    await crashed.finish(child_state, retention=3600)
    await crashed.save(
        msgspec.structs.replace(
            state,
            status="invoking",
            result=None,
            finished_at=None,
            steps={**state.steps, step: record},
        )
    )

    async with LocalEngine([parent], store=crashed) as engine:
        host = engine._host
        host.route(host.resume_message("tk-parent", "p-1"), None)  # as a takeover does
        with anyio.fail_after(10):
            result = await engine.wait("p-1")

    assert result.state is TransactionState.DONE
    assert result.result == {"n": 42}
