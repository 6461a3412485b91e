"""Behaviour: edge cases of the section 3 rules (retries vs compensation, timeouts, nesting...)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator import (
    StepContext,
    StepNotAwaitingError,
    StepResponse,
    StepState,
    TransactionNotFoundError,
    TransactionState,
    WorkflowData,
    WorkflowFailedError,
    create_hook,
    create_step,
    create_workflow,
    parallelize,
    transform,
    when,
)

pytestmark = pytest.mark.anyio


async def test_retrying_sibling_is_not_reinvoked_once_compensation_began(make_engine, kit) -> None:
    breaker = kit.step("breaker", fail=True)
    # fails at once, then would retry after a long interval: compensation must come first
    flaky = kit.step("flaky", fail=True, max_retries=5, retry_interval=30)

    @create_workflow("retry-vs-comp")
    def wf(input: WorkflowData) -> Any:
        return parallelize(breaker(input), flaky(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log.count("flaky") == 1
    assert sorted(kit.log[2:]) == ["c:breaker", "c:flaky"]
    assert result.step_table["flaky"].state is StepState.REVERTED


async def test_step_timeout_is_retried(make_engine, kit) -> None:
    @create_step("slow-then-fast", timeout=0.1, max_retries=1)
    async def slow_then_fast(data: Any, ctx: StepContext) -> int:
        kit.log.append(f"attempt:{ctx.attempt}")
        if ctx.attempt == 1:
            await anyio.sleep_forever()
        return ctx.attempt

    @create_workflow("timeout-retry")
    def wf(input: WorkflowData) -> Any:
        return slow_then_fast(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf)

    assert result.state is TransactionState.DONE
    assert result.result == 2
    assert kit.log == ["attempt:1", "attempt:2"]


async def test_async_step_timeout_while_awaiting(make_engine, kit) -> None:
    first = kit.step("first")
    waits = kit.step("waits", output=None, async_=True, timeout=0.1)

    @create_workflow("async-timeout")
    def wf(input: WorkflowData) -> Any:
        return waits(first(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            paused = await engine.run(wf, transaction_id="at-1")
            final = await engine.wait("at-1")

    assert paused.state is TransactionState.INVOKING
    assert final.state is TransactionState.REVERTED
    assert kit.log == ["first", "waits", "c:waits", "c:first"]
    assert [e.type for e in final.errors] == ["StepTimeoutError"]


async def test_set_step_failure_without_force_is_retried(make_engine, kit) -> None:
    @create_step("approve", async_=True, max_retries=1)
    async def approve(data: Any, ctx: StepContext) -> None:
        kit.log.append(f"approve:{ctx.attempt}")

    @create_workflow("async-retry")
    def wf(input: WorkflowData) -> Any:
        return approve(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="ar-1")
            await kit.logged("approve:1")
            again = await engine.set_step_failure("async-retry:ar-1:approve:invoke", "not yet")
            await kit.logged("approve:2")
            assert again.state is TransactionState.INVOKING
            assert kit.log == ["approve:1", "approve:2"]
            final = await engine.set_step_success("async-retry:ar-1:approve:invoke", "yes")

    assert final.state is TransactionState.DONE
    assert final.result == "yes"
    assert final.step_table["approve"].attempts == 2


async def test_nested_child_with_async_step_completed_from_outside(make_engine, kit) -> None:
    keys: list[str] = []
    got_key = anyio.Event()

    @create_step("child-wait", async_=True)
    async def child_wait(data: Any, ctx: StepContext) -> None:
        keys.append(ctx.idempotency_key)
        got_key.set()

    @create_workflow("child-async")
    def child(input: WorkflowData) -> Any:
        return child_wait(input)

    after = kit.step("after")

    @create_workflow("parent-async")
    def parent(input: WorkflowData) -> Any:
        return after(child.run_as_step(input=input))

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5):
            paused = await engine.run(parent, input=1, transaction_id="pa-1")
            assert paused.state is TransactionState.INVOKING
            await got_key.wait()  # the child's async handler runs in the background
            await engine.set_step_success(keys[0], {"approved": 1})
            final = await engine.wait("pa-1")

    assert final.state is TransactionState.DONE
    assert final.result == {"step": "after", "input": {"approved": 1}}


async def test_nested_child_sees_the_run_context(make_engine, kit) -> None:
    seen: list[Any] = []

    @create_step("ctx-reader")
    async def ctx_reader(data: Any, ctx: StepContext) -> None:
        seen.append(dict(ctx.context))

    @create_workflow("child-ctx")
    def child(input: WorkflowData) -> Any:
        return ctx_reader(input)

    @create_workflow("parent-ctx")
    def parent(input: WorkflowData) -> Any:
        return child.run_as_step(input=input)

    async with make_engine([parent]) as engine:
        with anyio.fail_after(5):
            await engine.run(parent, context={"tenant": "t1"})

    assert seen == [{"tenant": "t1"}]


async def test_cancel_done_parent_compensates_nested_child(make_engine, kit) -> None:
    c1 = kit.step("c1")
    p1, p2 = kit.step("p1"), kit.step("p2")

    @create_workflow("child-c")
    def child(input: WorkflowData) -> Any:
        return c1(input)

    @create_workflow("parent-c")
    def parent(input: WorkflowData) -> Any:
        return p2(child.run_as_step(input=p1(input)))

    async with make_engine([parent], container=kit.container) as engine:
        with anyio.fail_after(5):
            await engine.run(parent, transaction_id="pc-1")
            final = await engine.cancel("pc-1")
            children = await engine.list(child)

    assert final.state is TransactionState.REVERTED
    assert kit.log == ["p1", "c1", "p2", "c:p2", "c:c1", "c:p1"]
    assert [c.state for c in children] == [TransactionState.REVERTED]


async def test_continue_on_failure_step_is_compensated_when_a_later_step_fails(
    make_engine, kit
) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", fail=True, continue_on_permanent_failure=True)
    s3 = kit.step("s3", fail=True)

    @create_workflow("continue-then-fail")
    def wf(input: WorkflowData) -> Any:
        return s3(s2(s1(input)))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["s1", "s2", "s3", "c:s3", "c:s2", "c:s1"]
    assert kit.comp_inputs["s2"] is None
    assert [e.step for e in result.errors] == ["s2", "s3"]


async def test_skip_on_failure_spares_parallel_siblings(make_engine, kit) -> None:
    bad = kit.step("bad", fail=True, skip_on_permanent_failure=True)
    good = kit.step("good")
    after_bad = kit.step("after-bad")

    @create_workflow("skip-parallel")
    def wf(input: WorkflowData) -> Any:
        # the branch that fails is composed second: parallelize's block begins at its first
        # argument's step, so `bad` is inside the block, not before it
        g, b = parallelize(good(input), after_bad(bad(input)))
        return {"b": b, "g": g}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf)

    assert result.state is TransactionState.DONE
    assert result.step_table["good"].state is StepState.DONE
    assert result.step_table["after-bad"].state is StepState.SKIPPED_FAILURE
    assert result.result == {"b": None, "g": {"step": "good", "input": None}}


async def test_when_predicate_raising_fails_and_compensates(make_engine, kit) -> None:
    s1 = kit.step("s1")
    inner = kit.step("inner")

    def explode(v: Any) -> bool:
        raise KeyError("missing")

    @create_workflow("when-raises")
    def wf(input: WorkflowData) -> Any:
        a = s1(input)
        return when(a, explode).then(lambda: inner(a))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    # the error is charged to the block's first step, which counts as failed for good: like any
    # failed step (and as in Medusa, where the predicate runs inside the step) its compensation
    # runs with None, though its handler never ran
    assert kit.log == ["s1", "c:inner", "c:s1"]
    assert kit.comp_inputs["inner"] is None
    error = result.errors[0]
    assert error.step == "inner"
    assert error.type == "KeyError"
    assert "predicate" in error.message
    assert "when-1" in error.message


async def test_transform_raising_fails_the_consuming_step(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2")

    @create_workflow("transform-raises")
    def wf(input: WorkflowData) -> Any:
        a = s1(input)
        return s2(transform(a, lambda v: v["nope"]))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    # s2's handler never ran; s2 failed for good, so its compensation gets None
    assert kit.log == ["s1", "c:s2", "c:s1"]
    assert kit.comp_inputs["s2"] is None
    assert result.errors[0].step == "s2"
    assert result.errors[0].type == "KeyError"
    assert "Traceback" in result.errors[0].traceback


async def test_unencodable_workflow_result_reverts(make_engine, kit) -> None:
    s1 = kit.step("s1")

    @create_workflow("result-junk")
    def wf(input: WorkflowData) -> Any:
        return transform(s1(input), lambda v: object())

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["s1", "c:s1"]
    assert result.errors
    assert "object" in result.errors[0].message


async def test_hook_inside_false_when_runs_no_handler(make_engine, kit, collect) -> None:
    @create_workflow("hook-in-when")
    def wf(input: WorkflowData) -> Any:
        return when(input, lambda i: i["go"]).then(lambda: create_hook("maybe", input).get_result())

    @wf.hooks.maybe
    async def handler(payload: Any) -> str:
        kit.log.append("handler")
        return "ran"

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            skipped = await engine.run(wf, input={"go": False})
            ran = await engine.run(wf, input={"go": True})

    assert skipped.result is None
    assert ran.result == "ran"
    assert kit.log == ["handler"]


async def test_distinct_compensate_input(make_engine, kit) -> None:
    received: list[Any] = []

    @create_step("reserve")
    async def reserve(data: Any) -> StepResponse[dict[str, Any]]:
        return StepResponse({"reservation": "r-9", "items": [1, 2]}, compensate_input="r-9")

    @reserve.compensate
    async def release(reservation_id: Any) -> None:
        received.append(reservation_id)

    boom = kit.step("boom", fail=True)

    @create_workflow("comp-input")
    def wf(input: WorkflowData) -> Any:
        return boom(reserve(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert received == ["r-9"]
    assert kit.comp_inputs["boom"] is None


async def test_step_concurrency_limit_across_transactions(make_engine, kit) -> None:
    running = {"now": 0, "max": 0}

    @create_step("limited", concurrency=1)
    async def limited(data: Any) -> int:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await anyio.sleep(0.01)
        running["now"] -= 1
        return data

    @create_workflow("limited-wf")
    def wf(input: WorkflowData) -> Any:
        return limited(input)

    results: list[Any] = []
    async with make_engine([wf]) as engine:

        async def run(i: int) -> None:
            results.append((await engine.run(wf, input=i)).result)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(run, i)

    assert sorted(results) == [0, 1, 2, 3]
    assert running["max"] == 1


async def test_idempotent_rerun_of_a_reverted_transaction_raises_again(make_engine, kit) -> None:
    bad = kit.step("bad", fail=True)

    @create_workflow("rerun-reverted")
    def wf(input: WorkflowData) -> Any:
        return bad(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            with pytest.raises(WorkflowFailedError) as first:
                await engine.run(wf, transaction_id="rr-1")
            with pytest.raises(WorkflowFailedError) as second:
                await engine.run(wf, transaction_id="rr-1")

    assert kit.log == ["bad", "c:bad"]
    assert first.value.result.errors == second.value.result.errors


async def test_zero_retention_forgets_finished_transactions(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("forgotten", retention=0)
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, transaction_id="fg-1")
            with pytest.raises(TransactionNotFoundError):
                await engine.get("fg-1")

    assert result.state is TransactionState.DONE


async def test_retry_step_on_a_step_that_is_not_awaiting(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("retry-not-awaiting")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="rna-1")
            with pytest.raises(StepNotAwaitingError):
                await engine.retry_step("retry-not-awaiting:rna-1:s:invoke")

    assert kit.log == ["s"]


async def test_cancel_twice_compensates_once(make_engine, kit) -> None:
    s1 = kit.step("s1")

    @create_workflow("cancel-twice")
    def wf(input: WorkflowData) -> Any:
        return s1(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="ct-1")
            first = await engine.cancel("ct-1")
            second = await engine.cancel("ct-1")

    assert first.state is second.state is TransactionState.REVERTED
    assert kit.log == ["s1", "c:s1"]


async def test_workflow_timeout_while_step_waits_to_retry(
    make_engine, workflow_timeout, kit
) -> None:
    first = kit.step("first")
    flaky = kit.step("flaky", fail=True, max_retries=3, retry_interval=30)

    @create_workflow("timeout-retrying", timeout=workflow_timeout)
    def wf(input: WorkflowData) -> Any:
        return flaky(first(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["first", "flaky", "c:flaky", "c:first"]
    assert "WorkflowTimeoutError" in [e.type for e in result.errors]


async def test_sync_handler_error_has_traceback(make_engine, kit) -> None:
    def sync_boom(data: Any) -> None:
        raise LookupError("sync handler failed")

    step = create_step("sync-boom", sync_boom)

    @create_workflow("sync-error")
    def wf(input: WorkflowData) -> Any:
        return step(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    error = result.errors[0]
    assert (error.step, error.type, error.message) == (
        "sync-boom",
        "LookupError",
        "sync handler failed",
    )
    assert "sync_boom" in error.traceback


async def test_wait_on_unknown_transaction(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("wait-unknown")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5), pytest.raises(TransactionNotFoundError):
            await engine.wait("never-started")
