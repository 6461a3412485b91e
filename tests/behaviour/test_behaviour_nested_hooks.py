"""Behaviour: nested workflows (run_as_step) and hooks."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from orchestrator import (
    StepContext,
    StepState,
    TransactionState,
    WorkflowData,
    WorkflowFailedError,
    WorkflowResponse,
    create_hook,
    create_workflow,
    transform,
)

pytestmark = pytest.mark.anyio


def make_child(kit: Any, name: str, *, fail_c2: bool = False) -> Any:
    c1 = kit.step("c1")
    c2 = kit.step("c2", fail=fail_c2)

    @create_workflow(name)
    def child(input: WorkflowData) -> Any:
        a = c1(input)
        b = c2(a)
        return {"child": b["step"], "got": input}

    return child


async def test_nested_success_parent_gets_child_result(make_engine, kit) -> None:
    child = make_child(kit, "child-ok")
    p1, p2 = kit.step("p1"), kit.step("p2")

    @create_workflow("parent-ok")
    def parent(input: WorkflowData) -> Any:
        a = p1(input)
        c = child.run_as_step(input=transform(a, lambda v: v["input"]))
        return {"nested": c, "after": p2(c)}

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(parent, input={"order": 1})
            children = await engine.list("child-ok")

    assert result.state is TransactionState.DONE
    assert kit.log == ["p1", "c1", "c2", "p2"]
    assert result.result["nested"] == {"child": "c2", "got": {"order": 1}}
    assert result.result["after"] == {
        "step": "p2",
        "input": {"child": "c2", "got": {"order": 1}},
    }
    assert result.step_table["child-ok-as-step"].state is StepState.DONE
    # the child ran as its own transaction
    assert [c.state for c in children] == [TransactionState.DONE]
    assert children[0].transaction_id != result.transaction_id


async def test_nested_child_failure_compensates_child_then_parent(make_engine, kit) -> None:
    child = make_child(kit, "child-fails", fail_c2=True)
    p1, p2 = kit.step("p1"), kit.step("p2")

    @create_workflow("parent-child-fails")
    def parent(input: WorkflowData) -> Any:
        a = p1(input)
        return p2(child.run_as_step(input=a))

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(parent, input=1)
        children = await engine.list("child-fails")

    result = caught.value.result
    assert kit.log == ["p1", "c1", "c2", "c:c2", "c:c1", "c:p1"]
    assert result.state is TransactionState.REVERTED
    assert result.step_table["p1"].state is StepState.REVERTED
    assert result.step_table["p2"].state is StepState.NOT_STARTED
    assert [c.state for c in children] == [TransactionState.REVERTED]
    assert result.errors
    assert result.errors[0].step == "child-fails-as-step"
    assert "c2 failed" in result.errors[0].message


async def test_parent_failing_after_nested_child_compensates_child_in_order(
    make_engine, kit
) -> None:
    child = make_child(kit, "child-undone")
    p1 = kit.step("p1")
    p3 = kit.step("p3", fail=True)

    @create_workflow("parent-fails-later")
    def parent(input: WorkflowData) -> Any:
        a = p1(input)
        return p3(child.run_as_step(input=a))

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(parent, input=1, throw_on_error=False)
        children = await engine.list("child-undone")

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["p1", "c1", "c2", "p3", "c:p3", "c:c2", "c:c1", "c:p1"]
    assert result.step_table["child-undone-as-step"].state is StepState.REVERTED
    assert [c.state for c in children] == [TransactionState.REVERTED]


async def test_hook_publishes_payload_and_runs_every_handler(make_engine, kit, collect) -> None:
    reserve = kit.step("reserve", output={"id": "r-1"})
    after = kit.step("after")

    @create_workflow("with-hook")
    def wf(input: WorkflowData) -> WorkflowResponse:
        r = reserve(input)
        placed = create_hook("orderPlaced", {"order_id": r["id"], "total": input.total})
        done = after(placed.get_result())
        return WorkflowResponse({"hook": placed.get_result(), "after": done}, hooks=[placed])

    @wf.hooks.orderPlaced
    async def notify(payload: dict[str, Any], ctx: StepContext) -> str:
        kit.log.append(f"notify:{payload['order_id']}")
        return f"notified {payload['order_id']}"

    async def audit(payload: dict[str, Any]) -> dict[str, Any]:
        kit.log.append(f"audit:{payload['total']}")
        return {"audited": payload["total"]}

    wf.hooks.orderPlaced(audit)

    async with (
        make_engine([wf], container=kit.container) as engine,
        collect(lambda: engine.hooks(wf, "orderPlaced")) as payloads,
    ):
        with anyio.fail_after(5):
            result = await engine.run(wf, input={"total": 12})
        await payloads.wait_for(lambda items: len(items) >= 1)

    assert payloads.items == [{"order_id": "r-1", "total": 12}]
    assert result.state is TransactionState.DONE
    assert kit.log[0] == "reserve"
    assert sorted(kit.log[1:3]) == ["audit:12", "notify:r-1"]
    assert kit.log[3] == "after"
    assert result.result["hook"] == ["notified r-1", {"audited": 12}]
    assert result.result["after"]["input"] == ["notified r-1", {"audited": 12}]


async def test_hook_single_handler_result_and_no_handler(make_engine, kit) -> None:
    @create_workflow("hook-one")
    def one(input: WorkflowData) -> Any:
        h = create_hook("validate", input)
        return h.get_result()

    @one.hooks.validate
    async def check(payload: Any) -> dict[str, Any]:
        return {"valid": payload["x"] > 0}

    @create_workflow("hook-none")
    def none(input: WorkflowData) -> Any:
        h = create_hook("unused", input)
        return {"hook": h.get_result(), "input": input}

    async with make_engine([one, none]) as engine:
        with anyio.fail_after(5):
            r1 = await engine.run(one, input={"x": 3})
            r2 = await engine.run(none, input={"x": 3})

    assert r1.result == {"valid": True}
    assert r2.state is TransactionState.DONE
    assert r2.result == {"hook": None, "input": {"x": 3}}


async def test_hook_handler_raising_compensates_workflow(make_engine, kit) -> None:
    reserve = kit.step("reserve")

    @create_workflow("hook-fails")
    def wf(input: WorkflowData) -> Any:
        r = reserve(input)
        create_hook("placed", r)
        return r

    async def good(payload: Any) -> str:
        kit.log.append("good")
        return "ok"

    async def undo_good(data: Any) -> None:
        kit.log.append("c:good")

    async def bad(payload: Any) -> str:
        kit.log.append("bad")
        raise ValueError("handler exploded")

    wf.hooks.placed(good, undo_good)
    wf.hooks.placed(bad)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(wf, input=1)

    result = caught.value.result
    assert result.state is TransactionState.REVERTED
    assert sorted(kit.log[1:3]) == ["bad", "good"]
    assert kit.log[3:] == ["c:good", "c:reserve"]
    assert [(e.type, e.message) for e in result.errors] == [("ValueError", "handler exploded")]
    assert result.errors[0].step.startswith("placed-")


class Verdict(msgspec.Struct):
    ok: bool


async def test_hook_result_validator(make_engine, kit) -> None:
    after = kit.step("after")

    @create_workflow("hook-validated")
    def wf(input: WorkflowData) -> Any:
        h = create_hook("check", input, result_validator=Verdict)
        return after(h.get_result())

    @wf.hooks.check
    async def check(payload: Any) -> dict[str, Any]:
        return {"ok": payload["answer"]}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            good = await engine.run(wf, input={"answer": True})
            bad = await engine.run(wf, input={"answer": "maybe"}, throw_on_error=False)

    assert good.result == {"step": "after", "input": {"ok": True}}
    assert bad.state is TransactionState.REVERTED
    assert kit.log == ["after", "c:after"]  # the consumer failed on the invalid hook result
    assert bad.errors[0].step == "after"
    assert bad.errors[0].type == "ValidationError"
