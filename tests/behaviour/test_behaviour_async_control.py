"""Behaviour: async steps, external completion, idempotency, timeouts, cancel, get/list, events."""

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
    parallelize,
)

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------------------ idempotency
async def test_idempotent_rerun_after_finish_runs_once(make_engine, kit) -> None:
    counter = {"n": 0}

    @create_step("effect")
    async def effect(data: Any) -> dict[str, Any]:
        counter["n"] += 1
        return {"charged": data["amount"], "n": counter["n"]}

    @create_workflow("idem-after", idempotent=True)
    def wf(input: WorkflowData) -> Any:
        return effect(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            first = await engine.run(wf, input={"amount": 10}, transaction_id="order-42")
            second = await engine.run(wf, input={"amount": 999}, transaction_id="order-42")
            third = await wf(engine).run(input={"amount": 1}, transaction_id="order-42")

    assert counter["n"] == 1
    assert first.result == second.result == third.result == {"charged": 10, "n": 1}
    assert second.transaction_id == "order-42"
    assert second.state is TransactionState.DONE


async def test_idempotent_concurrent_runs_attach_to_one_execution(
    make_engine, kit, wait_until
) -> None:
    counter = {"n": 0}
    started = anyio.Event()
    gate = anyio.Event()

    @create_step("slow-effect")
    async def slow_effect(data: Any) -> int:
        counter["n"] += 1
        started.set()
        with anyio.fail_after(5):
            await gate.wait()
        return counter["n"]

    @create_workflow("idem-running")
    def wf(input: WorkflowData) -> Any:
        return slow_effect(input)

    results: list[Any] = []

    async with make_engine([wf]) as engine:

        async def run() -> None:
            results.append(await engine.run(wf, input=1, transaction_id="same"))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                tg.start_soon(run)  # both start at once: a race on the same id
                await started.wait()
                running = await engine.get("same")
                assert running.state is TransactionState.INVOKING
                tg.start_soon(run)  # a third attaches while the step runs
                await anyio.wait_all_tasks_blocked()
                gate.set()

    assert counter["n"] == 1
    assert len(results) == 3
    assert {r.result for r in results} == {1}
    assert {r.state for r in results} == {TransactionState.DONE}


# ------------------------------------------------------------------------------ async steps
async def test_async_step_completed_by_set_step_success(make_engine, kit) -> None:
    keys: list[str] = []

    @create_step("approval", async_=True)
    async def approval(data: Any, ctx: StepContext) -> None:
        keys.append(ctx.idempotency_key)
        kit.log.append("approval")

    after = kit.step("after")

    @create_workflow("async-ok")
    def wf(input: WorkflowData) -> Any:
        a = approval(input)
        return {"approval": a, "after": after(a)}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            first = await engine.run(wf, input={"doc": 1}, transaction_id="tx-a")
            await kit.logged("approval")
            assert first.state is TransactionState.INVOKING
            assert first.step_table["approval"].state is StepState.INVOKING
            assert kit.log == ["approval"]
            assert keys == ["async-ok:tx-a:approval:invoke"]
            final = await engine.set_step_success(keys[0], {"approved": True})
            waited = await engine.wait("tx-a")

    assert final.state is TransactionState.DONE
    assert final.result == {
        "approval": {"approved": True},
        "after": {"step": "after", "input": {"approved": True}},
    }
    assert waited.result == final.result
    assert kit.log == ["approval", "after"]


async def test_async_step_failed_by_set_step_failure_compensates(make_engine, kit) -> None:
    first = kit.step("first")

    @create_step("approval", async_=True, max_retries=3)
    async def approval(data: Any) -> None:
        kit.log.append("approval")

    @approval.compensate
    async def undo_approval(data: Any) -> None:
        kit.log.append("c:approval")
        kit.comp_inputs["approval"] = data

    @create_workflow("async-fail")
    def wf(input: WorkflowData) -> Any:
        return approval(first(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            started = await engine.run(wf, transaction_id="tx-f")
            await kit.logged("approval")
            assert started.state is TransactionState.INVOKING
            final = await engine.set_step_failure(
                "async-fail:tx-f:approval:invoke",
                ValueError("rejected by a human"),
                force_permanent=True,
            )

    assert final.state is TransactionState.REVERTED
    assert kit.log == ["first", "approval", "c:approval", "c:first"]
    assert kit.comp_inputs["approval"] is None
    assert [(e.step, e.type, e.message) for e in final.errors] == [
        ("approval", "ValueError", "rejected by a human")
    ]


async def test_async_step_completes_in_background(make_engine, kit) -> None:
    release = anyio.Event()
    started = anyio.Event()

    @create_step("background", async_=True)
    async def background(data: Any) -> dict[str, Any]:
        started.set()
        with anyio.fail_after(5):
            await release.wait()
        return {"computed": data * 2}

    after = kit.step("after")

    @create_workflow("async-bg")
    def wf(input: WorkflowData) -> Any:
        return after(background(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            handle = await engine.start(wf, input=21, transaction_id="bg-1")
            await started.wait()
            running = await handle.get()
            assert running.state is TransactionState.INVOKING
            assert running.step_table["background"].state is StepState.INVOKING
            release.set()
            final = await handle.wait()

    assert final.state is TransactionState.DONE
    assert final.result == {"step": "after", "input": {"computed": 42}}


async def test_run_returns_invoking_while_background_async_step_runs(make_engine, kit) -> None:
    release = anyio.Event()

    @create_step("background", async_=True)
    async def background(data: Any) -> str:
        with anyio.fail_after(5):
            await release.wait()
        return "late"

    @create_workflow("async-bg-run")
    def wf(input: WorkflowData) -> Any:
        return background(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            first = await engine.run(wf, transaction_id="bg-2")
            release.set()
            final = await engine.wait("bg-2")

    assert first.state is TransactionState.INVOKING
    assert final.state is TransactionState.DONE
    assert final.result == "late"


async def test_compensate_async_completed_by_set_step_success(make_engine, kit) -> None:
    keys: list[str] = []
    got_key = anyio.Event()

    @create_step("refund", compensate_async=True)
    async def charge(data: Any) -> str:
        kit.log.append("charge")
        return "ch-1"

    @charge.compensate
    async def refund(data: Any, ctx: StepContext) -> None:
        kit.log.append(f"c:charge:{data}")
        keys.append(ctx.idempotency_key)
        got_key.set()

    boom = kit.step("boom", fail=True)

    @create_workflow("comp-async")
    def wf(input: WorkflowData) -> Any:
        return boom(charge(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            paused = await engine.run(wf, transaction_id="ca-1")
            assert paused.state is TransactionState.COMPENSATING
            assert paused.step_table["refund"].state is StepState.COMPENSATING
            await got_key.wait()  # the async compensation runs in the background
            assert keys == ["comp-async:ca-1:refund:compensate"]
            final = await engine.set_step_success(keys[0])

    assert final.state is TransactionState.REVERTED
    assert kit.log == ["charge", "boom", "c:boom", "c:charge:ch-1"]
    assert final.step_table["refund"].state is StepState.REVERTED


async def test_retry_step_reinvokes_an_awaiting_step(make_engine, kit, collect) -> None:
    @create_step("poll", async_=True)
    async def poll(data: Any, ctx: StepContext) -> Any:
        kit.log.append(f"poll:{ctx.attempt}")
        if ctx.attempt == 1:
            return None  # waits for an answer from outside
        return {"answer": ctx.attempt}

    @create_workflow("retry-step")
    def wf(input: WorkflowData) -> Any:
        return poll(input)

    async with (
        make_engine([wf], container=kit.container) as engine,
        collect(lambda: engine.events(transaction_id="rs-1")) as events,
    ):
        with anyio.fail_after(5):
            first = await engine.run(wf, transaction_id="rs-1")
            assert first.state is TransactionState.INVOKING
            # retry_step is for a step that awaits: its handler returned (in the background)
            await events.wait_for(lambda evs: any(e.type == "step_awaiting" for e in evs))
            await engine.retry_step("retry-step:rs-1:poll:invoke")
            final = await engine.wait("rs-1")

    assert kit.log == ["poll:1", "poll:2"]
    assert final.state is TransactionState.DONE
    assert final.result == {"answer": 2}
    assert final.step_table["poll"].attempts == 2


async def test_retry_step_reinvokes_a_background_step_still_running(make_engine, kit) -> None:
    release = anyio.Event()

    @create_step("slow-poll", async_=True)
    async def slow_poll(data: Any, ctx: StepContext) -> Any:
        kit.log.append(f"poll:{ctx.attempt}")
        if ctx.attempt == 1:
            await release.wait()  # still running in the background when the retry comes
            return {"answer": "late"}
        return {"answer": ctx.attempt}

    @create_workflow("retry-running")
    def wf(input: WorkflowData) -> Any:
        return slow_poll(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            first = await engine.run(wf, transaction_id="rr-1")
            assert first.state is TransactionState.INVOKING
            await kit.logged("poll:1")
            await engine.retry_step("retry-running:rr-1:slow-poll:invoke")
            final = await engine.wait("rr-1")
            release.set()  # the first attempt answers now: stale, ignored
            again = await engine.get("rr-1")

    assert final.state is TransactionState.DONE
    assert final.result == {"answer": 2}
    assert final.step_table["slow-poll"].attempts == 2
    assert again.result == {"answer": 2}


# ------------------------------------------------------------------------------ timeouts
async def test_step_timeout_cancels_handler_and_compensates(make_engine, kit, collect) -> None:
    cancelled = anyio.Event()
    release = anyio.Event()
    first = kit.step("first")

    @create_step("hangs", timeout=0.1)
    async def hangs(data: Any) -> None:
        kit.log.append("hangs")
        try:
            await anyio.sleep_forever()
        finally:
            kit.log.append("hangs:cancelled")
            cancelled.set()

    @hangs.compensate
    async def undo_hangs(data: Any) -> None:
        kit.log.append("c:hangs")

    @create_step("sibling")
    async def sibling(data: Any) -> str:
        with anyio.fail_after(5):
            await release.wait()
        kit.log.append("sibling")
        return "s"

    @create_workflow("step-timeout")
    def wf(input: WorkflowData) -> Any:
        f = first(input)
        return parallelize(hangs(f), sibling(f))

    async with (
        make_engine([wf], container=kit.container) as engine,
        collect(lambda: engine.events(transaction_id="st-1")) as events,
    ):
        with anyio.fail_after(5):
            handle = await engine.start(wf, transaction_id="st-1")
            await cancelled.wait()
            await events.wait_for(
                lambda evs: any(e.type == "step_failure" and e.step == "hangs" for e in evs)
            )
            midway = await handle.get()
            release.set()
            final = await handle.wait()

    assert midway.step_table["hangs"].state is StepState.TIMEOUT
    assert final.state is TransactionState.REVERTED
    assert kit.log == ["first", "hangs", "hangs:cancelled", "sibling", "c:hangs", "c:first"]
    failure = next(e for e in events.items if e.type == "step_failure")
    assert failure.error is not None
    assert failure.error.type == "StepTimeoutError"
    assert [e.type for e in final.errors] == ["StepTimeoutError"]
    assert final.errors[0].step == "hangs"


async def test_workflow_timeout_aborts_running_step_and_compensates(
    make_engine, workflow_timeout, kit
) -> None:
    first = kit.step("first")

    @create_step("endless")
    async def endless(data: Any) -> None:
        kit.log.append("endless")
        try:
            await anyio.sleep_forever()
        finally:
            kit.log.append("endless:cancelled")

    @endless.compensate
    async def undo_endless(data: Any) -> None:
        kit.log.append("c:endless")

    never = kit.step("never")

    @create_workflow("wf-timeout", timeout=workflow_timeout)
    def wf(input: WorkflowData) -> Any:
        return never(endless(first(input)))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(wf)

    result = caught.value.result
    assert result.state is TransactionState.REVERTED
    assert kit.log == ["first", "endless", "endless:cancelled", "c:endless", "c:first"]
    assert "WorkflowTimeoutError" in [e.type for e in result.errors]
    assert result.step_table["never"].state is StepState.NOT_STARTED


# ------------------------------------------------------------------------------ cancel
async def test_cancel_finished_transaction_compensates_everything(make_engine, kit) -> None:
    s1, s2, s3 = kit.step("s1"), kit.step("s2"), kit.step("s3")

    @create_workflow("cancel-done")
    def wf(input: WorkflowData) -> Any:
        return s3(s2(s1(input)))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            done = await engine.run(wf, transaction_id="cd-1")
            assert done.state is TransactionState.DONE
            cancelled = await engine.cancel("cd-1")
            after = await engine.get("cd-1")

    assert kit.log == ["s1", "s2", "s3", "c:s3", "c:s2", "c:s1"]
    assert cancelled.state is TransactionState.REVERTED
    assert after.state is TransactionState.REVERTED
    assert {s.state for s in cancelled.steps} == {StepState.REVERTED}


async def test_cancel_running_transaction_stops_forward_steps(make_engine, kit, wait_until) -> None:
    started = anyio.Event()
    gate = anyio.Event()
    s1, s3 = kit.step("s1"), kit.step("s3")

    @create_step("s2")
    async def s2(data: Any) -> str:
        kit.log.append("s2")
        started.set()
        with anyio.fail_after(5):
            await gate.wait()
        return "s2-out"

    @s2.compensate
    async def undo_s2(data: Any) -> None:
        kit.log.append(f"c:s2:{data}")

    @create_workflow("cancel-running")
    def wf(input: WorkflowData) -> Any:
        return s3(s2(s1(input)))

    box: list[Any] = []
    async with make_engine([wf], container=kit.container) as engine:

        async def cancel() -> None:
            box.append(await engine.cancel("cr-1"))

        with anyio.fail_after(5):
            await engine.start(wf, transaction_id="cr-1")
            await started.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel)
                await wait_until(
                    lambda: engine.get("cr-1"),
                    lambda r: r.state is not TransactionState.INVOKING,
                )
                gate.set()  # the step in flight finishes, then compensation starts

    assert kit.log == ["s1", "s2", "c:s2:s2-out", "c:s1"]
    assert box[0].state is TransactionState.REVERTED
    assert box[0].step_table["s3"].state is StepState.NOT_STARTED


async def test_cancel_awaiting_async_step(make_engine, kit) -> None:
    s1 = kit.step("s1")
    waits = kit.step("waits", output=None, async_=True)

    @create_workflow("cancel-awaiting")
    def wf(input: WorkflowData) -> Any:
        return waits(s1(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            paused = await engine.run(wf, transaction_id="ca-2")
            assert paused.state is TransactionState.INVOKING
            final = await engine.cancel("ca-2")

    assert final.state is TransactionState.REVERTED
    assert kit.log == ["s1", "waits", "c:waits", "c:s1"]


# ------------------------------------------------------------------------------ get / list
async def test_get_and_list_by_workflow_and_state(make_engine, kit) -> None:
    ok = kit.step("ok")
    bad = kit.step("bad", fail=True)

    @create_workflow("listed-a")
    def wf_a(input: WorkflowData) -> Any:
        return ok(input)

    @create_workflow("listed-b")
    def wf_b(input: WorkflowData) -> Any:
        return bad(input)

    async with make_engine([wf_a, wf_b], container=kit.container) as engine:
        with anyio.fail_after(5):
            await engine.run(wf_a, transaction_id="a1")
            await engine.run(wf_a, transaction_id="a2")
            await engine.run(wf_b, transaction_id="b1", throw_on_error=False)
            got = await engine.get("a1")
            all_runs = await engine.list()
            of_a = await engine.list("listed-a")
            of_b = await engine.list(wf_b)
            reverted = await engine.list(state="reverted")
            done_b = await engine.list("listed-b", state=TransactionState.DONE)

    assert got.transaction_id == "a1"
    assert got.state is TransactionState.DONE
    assert got.result == {"step": "ok", "input": None}
    assert {r.transaction_id for r in all_runs} == {"a1", "a2", "b1"}
    assert {r.transaction_id for r in of_a} == {"a1", "a2"}
    assert [r.transaction_id for r in of_b] == ["b1"]
    assert [r.transaction_id for r in reverted] == ["b1"]
    assert done_b == []


# ------------------------------------------------------------------------------ events
async def test_events_of_a_transaction_in_order(make_engine, kit, collect) -> None:
    s1, s2 = kit.step("s1"), kit.step("s2")

    @create_workflow("evented")
    def wf(input: WorkflowData) -> Any:
        return s2(s1(input))

    async with (
        make_engine([wf], container=kit.container) as engine,
        collect(lambda: engine.events(transaction_id="ev-1")) as events,
    ):
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="ev-1")
            await engine.run(wf, transaction_id="ev-other")  # not in this stream
            await events.wait_for(lambda evs: any(e.type == "finish" for e in evs))

    seen = [(e.type, e.step) for e in events.items]
    assert seen == [
        ("begin", None),
        ("step_begin", "s1"),
        ("step_success", "s1"),
        ("step_begin", "s2"),
        ("step_success", "s2"),
        ("finish", None),
    ]
    assert {e.transaction_id for e in events.items} == {"ev-1"}
    assert {e.workflow for e in events.items} == {"evented"}
    stamps = [e.timestamp for e in events.items]
    assert stamps == sorted(stamps)
    assert events.items[1].attempt == 1
    assert events.items[-1].state == "done"


async def test_events_of_a_failing_transaction(make_engine, kit, collect) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", fail=1, max_retries=1)
    s3 = kit.step("s3", fail=True)

    @create_workflow("evented-fail")
    def wf(input: WorkflowData) -> Any:
        return s3(s2(s1(input)))

    async with (
        make_engine([wf], container=kit.container) as engine,
        collect(lambda: engine.events(workflow="evented-fail")) as events,
    ):
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="evf-1", throw_on_error=False)
            await events.wait_for(lambda evs: any(e.type == "finish" for e in evs))

    seen = [(e.type, e.step, e.attempt) for e in events.items]
    assert seen == [
        ("begin", None, None),
        ("step_begin", "s1", 1),
        ("step_success", "s1", 1),
        ("step_begin", "s2", 1),
        ("step_failure", "s2", 1),
        ("step_begin", "s2", 2),
        ("step_success", "s2", 2),
        ("step_begin", "s3", 1),
        ("step_failure", "s3", 1),
        ("compensate_begin", None, None),
        ("compensate_step_begin", "s3", 1),
        ("compensate_step_success", "s3", 1),
        ("compensate_step_begin", "s2", 1),
        ("compensate_step_success", "s2", 1),
        ("compensate_step_begin", "s1", 1),
        ("compensate_step_success", "s1", 1),
        ("finish", None, None),
    ]
    assert events.items[-1].state == "reverted"
    assert events.items[8].error is not None
    assert events.items[8].error.step == "s3"
