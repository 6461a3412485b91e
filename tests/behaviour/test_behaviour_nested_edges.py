"""Behaviour: nested workflows at the edges (retries, failing compensation, timeouts, cancel)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator import (
    StepContext,
    StepState,
    TransactionState,
    WorkflowData,
    WorkflowFailedError,
    create_step,
    create_workflow,
)

pytestmark = pytest.mark.anyio


async def test_child_compensation_failing_leaves_parent_failed(make_engine, kit) -> None:
    c1 = kit.step("c1", comp_fail=True)
    c2 = kit.step("c2", fail=True)
    p1 = kit.step("p1")

    @create_workflow("child-comp-fails")
    def child(input: WorkflowData) -> Any:
        return c2(c1(input))

    @create_workflow("parent-of-failed-child")
    def parent(input: WorkflowData) -> Any:
        return child.run_as_step(input=p1(input))

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(parent)
        children = await engine.list(child)

    result = caught.value.result
    assert [c.state for c in children] == [TransactionState.FAILED]
    assert kit.log == ["p1", "c1", "c2", "c:c2", "c:c1", "c:p1"]
    assert result.state is TransactionState.FAILED
    assert result.step_table["p1"].state is StepState.REVERTED


async def test_nested_step_retried_runs_a_fresh_child(make_engine, kit) -> None:
    runs = {"n": 0}

    @create_step("sometimes")
    async def sometimes(data: Any, ctx: StepContext) -> int:
        runs["n"] += 1
        kit.log.append(f"sometimes:{runs['n']}")
        if runs["n"] == 1:
            raise RuntimeError("first child run fails")
        return runs["n"]

    @sometimes.compensate
    async def undo_sometimes(data: Any) -> None:
        kit.log.append(f"c:sometimes:{data}")

    @create_workflow("child-retried")
    def child(input: WorkflowData) -> Any:
        return sometimes(input)

    @create_workflow("parent-retries-child")
    def parent(input: WorkflowData) -> Any:
        return child.run_as_step(input=input).config(max_retries=1)

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(parent)
        children = await engine.list(child)

    assert result.state is TransactionState.DONE
    assert result.result == 2
    assert kit.log == ["sometimes:1", "c:sometimes:None", "sometimes:2"]
    assert sorted(c.state for c in children) == [TransactionState.DONE, TransactionState.REVERTED]
    assert result.step_table["child-retried-as-step"].attempts == 2


async def test_workflow_timeout_with_a_running_nested_child(
    make_engine, workflow_timeout, kit
) -> None:
    p1 = kit.step("p1")

    @create_step("child-hangs")
    async def child_hangs(data: Any) -> None:
        kit.log.append("child-hangs")
        try:
            await anyio.sleep_forever()
        finally:
            kit.log.append("child-hangs:cancelled")

    @create_workflow("hanging-child")
    def child(input: WorkflowData) -> Any:
        return child_hangs(input)

    @create_workflow("parent-times-out", timeout=workflow_timeout)
    def parent(input: WorkflowData) -> Any:
        return child.run_as_step(input=p1(input))

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(1.5):  # the workflow times out after 0.2 s
            result = await engine.run(parent, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert "WorkflowTimeoutError" in [e.type for e in result.errors]
    assert kit.log == ["p1", "child-hangs", "child-hangs:cancelled", "c:p1"]


async def test_one_child_workflow_nested_twice(make_engine, kit) -> None:
    c1 = kit.step("c1")

    @create_workflow("child-twice")
    def child(input: WorkflowData) -> Any:
        return c1(input)

    @create_workflow("parent-twice")
    def parent(input: WorkflowData) -> Any:
        first = child.run_as_step(input=input["a"])
        second = child.run_as_step(input=input["b"]).config(name="child-twice-again")
        return {"first": first, "second": second}

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(1.5):
            result = await engine.run(parent, input={"a": 1, "b": 2})

    assert result.state is TransactionState.DONE
    assert result.result == {
        "first": {"step": "c1", "input": 1},
        "second": {"step": "c1", "input": 2},
    }
    assert kit.log == ["c1", "c1"]


async def test_grandchild_workflow(make_engine, kit) -> None:
    g1 = kit.step("g1")
    c1 = kit.step("c1")
    p1 = kit.step("p1", fail=True)

    @create_workflow("grandchild")
    def grandchild(input: WorkflowData) -> Any:
        return g1(input)

    @create_workflow("middle")
    def middle(input: WorkflowData) -> Any:
        return grandchild.run_as_step(input=c1(input))

    @create_workflow("top")
    def top(input: WorkflowData) -> Any:
        return p1(middle.run_as_step(input=input))

    async with make_engine([top], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(top, input=0, throw_on_error=False)
        states = {wf: [r.state for r in await engine.list(wf)] for wf in ("middle", "grandchild")}

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["c1", "g1", "p1", "c:p1", "c:g1", "c:c1"]
    assert states == {
        "middle": [TransactionState.REVERTED],
        "grandchild": [TransactionState.REVERTED],
    }


async def test_compensating_a_child_that_is_no_longer_retained_fails_clearly(
    make_engine, kit
) -> None:
    c1 = kit.step("gone-c1")
    boom = kit.step("gone-boom", fail=True)

    @create_workflow("gone-child", retention=0)  # forgotten as soon as it finishes
    def child(input: WorkflowData) -> Any:
        return c1(input)

    @create_workflow("gone-parent")
    def parent(input: WorkflowData) -> Any:
        return boom(child.run_as_step(input=input))

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(parent, transaction_id="gp-1", throw_on_error=False)

    assert result.state is TransactionState.FAILED
    gone = [e for e in result.errors if e.action == "compensate"]
    assert len(gone) == 1
    assert gone[0].type == "TransactionNotFoundError"
    assert "cannot be compensated" in gone[0].message
    assert kit.log == ["gone-c1", "gone-boom", "c:gone-boom"]
