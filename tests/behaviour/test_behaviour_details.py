"""Behaviour: details (error classification, names with ':', lifecycle event kinds...)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator import (
    ConfigurationError,
    StepContext,
    StepResponse,
    StepState,
    TransactionState,
    WorkflowData,
    create_step,
    create_workflow,
    parallelize,
    when,
)

pytestmark = pytest.mark.anyio


async def test_handler_raising_its_own_timeout_error_is_an_ordinary_failure(
    make_engine, kit, collect
) -> None:
    release = anyio.Event()

    @create_step("calls-upstream")
    async def calls_upstream(data: Any) -> None:
        raise TimeoutError("upstream did not answer")

    @create_step("sibling")
    async def sibling(data: Any) -> None:
        with anyio.fail_after(5):
            await release.wait()

    @create_workflow("own-timeout")
    def wf(input: WorkflowData) -> Any:
        return parallelize(calls_upstream(input), sibling(input))

    async with (
        make_engine([wf]) as engine,
        collect(lambda: engine.events(transaction_id="ot-1")) as events,
    ):
        box: list[Any] = []

        async def run() -> None:
            box.append(await engine.run(wf, transaction_id="ot-1", throw_on_error=False))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await events.wait_for(lambda evs: any(e.type == "step_failure" for e in evs))
                midway = await engine.get("ot-1")
                release.set()  # the run ends once the sibling finishes

    result = box[0]
    assert result.state is TransactionState.REVERTED
    error = result.errors[0]
    assert (error.step, error.type) == ("calls-upstream", "TimeoutError")
    assert error.message == "upstream did not answer"
    assert "Traceback" in error.traceback
    # the step did not run out of its (unset) timeout: it failed
    assert midway.step_table["calls-upstream"].state is StepState.FAILED


async def test_names_with_colons_in_idempotency_keys(make_engine, kit) -> None:
    keys: list[str] = []

    @create_step("ns:approve", async_=True)
    async def approve(data: Any, ctx: StepContext) -> None:
        keys.append(ctx.idempotency_key)
        kit.log.append("approve")

    @create_workflow("ns:flow")
    def wf(input: WorkflowData) -> Any:
        return approve(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="t:1:invoke")
            await kit.logged("approve")
            assert keys == ["ns:flow:t:1:invoke:ns:approve:invoke"]
            final = await engine.set_step_success(keys[0], "ok")

    assert final.state is TransactionState.DONE
    assert final.result == "ok"


async def test_event_kinds_skipped_awaiting_and_timeout(
    make_engine, workflow_timeout, kit, collect
) -> None:
    never = kit.step("never")
    waits = kit.step("waits", output=None, async_=True)

    @create_workflow("event-kinds", timeout=workflow_timeout)
    def wf(input: WorkflowData) -> Any:
        n = when(input, lambda i: False).then(lambda: never(input))
        return waits(n)

    async with (
        make_engine([wf], container=kit.container) as engine,
        collect(lambda: engine.events(transaction_id="ek-1")) as events,
    ):
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="ek-1")
            await events.wait_for(lambda evs: any(e.type == "finish" for e in evs))

    # `suspend` (the run only waits on async steps) is published once the turn that started
    # the async step ends, before its handler reports back.
    kinds = [(e.type, e.step) for e in events.items]
    assert kinds[:6] == [
        ("begin", None),
        ("step_skipped", "never"),
        ("step_begin", "waits"),
        ("suspend", None),
        ("step_awaiting", "waits"),
        ("timeout", None),
    ]
    assert kinds[-1] == ("finish", None)
    assert ("compensate_step_success", "waits") in kinds
    timeout = events.items[5]
    assert timeout.error is not None
    assert timeout.error.type == "WorkflowTimeoutError"
    assert events.items[-1].state == "reverted"


async def test_skipped_step_does_not_reorder_compensation(make_engine, kit) -> None:
    s1 = kit.step("s1")
    skipped = kit.step("skipped")
    s3 = kit.step("s3")
    s4 = kit.step("s4", fail=True)

    @create_workflow("skip-order")
    def wf(input: WorkflowData) -> Any:
        a = s1(input)
        b = when(a, lambda v: False).then(lambda: skipped(a))
        c = s3(b)
        return s4(c)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["s1", "s3", "s4", "c:s4", "c:s3", "c:s1"]
    assert result.step_table["skipped"].state is StepState.SKIPPED


async def test_when_block_with_several_steps_decides_once(make_engine, kit) -> None:
    calls: list[Any] = []
    a, b = kit.step("a"), kit.step("b")

    def predicate(v: Any) -> bool:
        calls.append(v)
        return True

    @create_workflow("when-several")
    def wf(input: WorkflowData) -> Any:
        return when(input, predicate).then(lambda: b(a(input)))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input={"x": 1})

    assert calls == [{"x": 1}]
    assert kit.log == ["a", "b"]
    assert result.result["step"] == "b"


async def test_permanent_failure_in_compensation_is_not_retried(make_engine, kit) -> None:
    calls: list[int] = []

    @create_step("undo-refuses", max_retries=3)
    async def undo_refuses(data: Any) -> str:
        return "done"

    @undo_refuses.compensate
    async def refuse(data: Any, ctx: StepContext) -> None:
        calls.append(ctx.attempt)
        StepResponse.permanent_failure("cannot undo")

    boom = kit.step("boom", fail=True)

    @create_workflow("comp-permanent")
    def wf(input: WorkflowData) -> Any:
        return boom(undo_refuses(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert calls == [1]
    assert result.state is TransactionState.FAILED
    assert [(e.step, e.action, e.type) for e in result.errors] == [
        ("boom", "invoke", "RuntimeError"),
        ("undo-refuses", "compensate", "PermanentFailure"),
    ]


async def test_compensation_retry_interval(make_engine, kit) -> None:
    s1 = kit.step("s1", comp_fail=2, max_retries=2, retry_interval=0.01, max_retry_interval=0.02)
    s2 = kit.step("s2", fail=True)

    @create_workflow("comp-interval")
    def wf(input: WorkflowData) -> Any:
        return s2(s1(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["s1", "s2", "c:s2", "c:s1", "c:s1", "c:s1"]
    assert result.step_table["s1"].compensate_attempts == 3


async def test_background_async_step_that_raises_is_compensated(make_engine, kit) -> None:
    first = kit.step("first")

    @create_step("bg-raises", async_=True)
    async def bg_raises(data: Any) -> None:
        kit.log.append("bg-raises")
        raise RuntimeError("background failure")

    @create_workflow("bg-fail")
    def wf(input: WorkflowData) -> Any:
        return bg_raises(first(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="bgf-1", throw_on_error=False)
            result = await engine.wait("bgf-1")

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["first", "bg-raises", "c:first"]


async def test_two_workflows_with_one_name_are_rejected(make_engine, kit) -> None:
    a = kit.step("a")
    one = create_workflow("twin", lambda input: a(input))
    two = create_workflow("twin", lambda input: a(input))

    with pytest.raises(ConfigurationError, match="twin"):
        async with make_engine([one, two]):
            pass


async def test_start_twice_with_one_id_runs_once(make_engine, kit) -> None:
    counter = {"n": 0}
    started = anyio.Event()

    @create_step("count")
    async def count(data: Any) -> int:
        counter["n"] += 1
        started.set()
        return counter["n"]

    @create_workflow("start-twice")
    def wf(input: WorkflowData) -> Any:
        return count(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            h1 = await engine.start(wf, transaction_id="st-x")
            h2 = await engine.start(wf, transaction_id="st-x")
            await started.wait()  # (waiting at once is test_wait_right_after_start)
            r1, r2 = await h1.wait(), await h2.wait()
            h3 = await engine.start(wf, transaction_id="st-x")
            r3 = await h3.wait()

    assert counter["n"] == 1
    assert r1.result == r2.result == r3.result == 1


START_RACE = (
    "LocalEngine.start returns before the coordinator has persisted the new transaction, and "
    "wait()/get() raise TransactionNotFoundError when the store has no state yet "
    "(orchestrator/_local.py: start -> _send_start only routes the message; _await and get "
    "load the store and raise on None)"
)


async def test_wait_right_after_start(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("start-then-wait")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            handle = await engine.start(wf, input=1, transaction_id="sw-1")
            result = await handle.wait()

    assert result.state is TransactionState.DONE
    assert result.result == {"step": "s", "input": 1}


async def test_get_right_after_start(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("start-then-get")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            handle = await engine.start(wf, input=1, transaction_id="sg-1")
            picture = await engine.get("sg-1")

    assert picture.transaction_id == "sg-1"
    assert picture.state in (
        TransactionState.NOT_STARTED,
        TransactionState.INVOKING,
        TransactionState.DONE,
    )
    assert handle.transaction_id == "sg-1"


async def test_same_step_name_in_two_workflows_keeps_each_handler(make_engine, kit) -> None:
    @create_step("validate")
    async def validate_order(data: Any) -> str:
        return "order-validated"

    @create_step("validate")
    async def validate_user(data: Any) -> str:
        return "user-validated"

    orders = create_workflow("orders", lambda input: validate_order(input))
    users = create_workflow("users", lambda input: validate_user(input))

    async with make_engine([orders, users]) as engine:
        with anyio.fail_after(5):
            r1 = await engine.run(orders)
            r2 = await engine.run(users)

    assert (r1.result, r2.result) == ("order-validated", "user-validated")


async def test_struct_output_feeds_a_typed_consumer(make_engine, kit) -> None:
    import msgspec

    class Money(msgspec.Struct):
        amount: int
        currency: str

    @create_step("price")
    async def price(data: Any) -> Money:
        return Money(amount=data, currency="EUR")

    @create_step("double")
    async def double(data: Any) -> Any:
        return {"amount": data["amount"] * 2, "currency": data["currency"]}

    @create_workflow("structs")
    def wf(input: WorkflowData) -> Any:
        p = price(input)
        return {"price": p, "double": double(p), "currency": p.currency}

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input=5)

    assert result.result == {
        "price": {"amount": 5, "currency": "EUR"},
        "double": {"amount": 10, "currency": "EUR"},
        "currency": "EUR",
    }


async def test_set_step_success_with_unencodable_response(make_engine, kit) -> None:
    waits = kit.step("waits", output=None, async_=True)

    @create_workflow("bad-response")
    def wf(input: WorkflowData) -> Any:
        return waits(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            await engine.run(wf, transaction_id="br-1")
            with pytest.raises(ConfigurationError, match="waits"):
                await engine.set_step_success("bad-response:br-1:waits:invoke", object())
            still = await engine.get("br-1")
            live = await engine.list(wf, state="invoking")
            final = await engine.set_step_success("bad-response:br-1:waits:invoke", "fine")

    assert still.state is TransactionState.INVOKING
    assert [r.transaction_id for r in live] == ["br-1"]
    assert final.state is TransactionState.DONE
    assert final.result == "fine"


async def test_later_failure_after_skip_on_permanent_failure(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", fail=True, skip_on_permanent_failure="s4")
    s3, s4 = kit.step("s3"), kit.step("s4")
    s5 = kit.step("s5", fail=True)

    @create_workflow("skip-then-fail")
    def wf(input: WorkflowData) -> Any:
        return s5(s4(s3(s2(s1(input)))))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    # the skipped step is not compensated; the failed-and-skipped-over s2 is (with None)
    assert kit.log == ["s1", "s2", "s4", "s5", "c:s5", "c:s4", "c:s2", "c:s1"]
    assert kit.comp_inputs["s2"] is None
    assert result.step_table["s3"].state is StepState.SKIPPED_FAILURE


async def test_sync_compensation_runs_in_a_thread(make_engine, kit) -> None:
    import threading

    main = threading.get_ident()
    seen: list[Any] = []

    def act(data: Any) -> str:
        return "acted"

    def undo(data: Any, ctx: StepContext) -> None:
        seen.append((data, ctx.action, threading.get_ident() != main))

    acting = create_step("acting", act, undo)
    boom = kit.step("boom", fail=True)

    @create_workflow("sync-comp")
    def wf(input: WorkflowData) -> Any:
        return boom(acting(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert seen == [("acted", "compensate", True)]
