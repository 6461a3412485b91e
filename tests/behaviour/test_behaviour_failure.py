"""Behaviour: failures, compensation order, retries, permanent failures, continue/skip."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest

from orchestrator import (
    StepContext,
    StepResponse,
    StepState,
    TransactionState,
    WorkflowData,
    WorkflowFailedError,
    create_step,
    create_workflow,
    parallelize,
)

pytestmark = pytest.mark.anyio


async def test_failure_at_step_3_compensates_in_reverse(make_engine, kit) -> None:
    s1, s2 = kit.step("s1"), kit.step("s2")
    s3 = kit.step("s3", fail=True)
    s4 = kit.step("s4")

    @create_workflow("fail-3")
    def wf(input: WorkflowData) -> Any:
        return s4(s3(s2(s1(input))))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(wf, input={"n": 1}, transaction_id="f3")

    assert kit.log == ["s1", "s2", "s3", "c:s3", "c:s2", "c:s1"]
    assert kit.comp_inputs["s3"] is None  # the failed step's compensation gets None
    assert kit.comp_inputs["s2"] == {"step": "s2", "input": {"step": "s1", "input": {"n": 1}}}
    assert kit.comp_inputs["s1"] == {"step": "s1", "input": {"n": 1}}
    result = caught.value.result
    assert isinstance(caught.value, Exception)
    assert result.transaction_id == "f3"
    assert result.state is TransactionState.REVERTED
    table = result.step_table
    for name in ("s1", "s2", "s3"):
        assert table[name].state is StepState.REVERTED
        assert table[name].compensate_attempts == 1
    assert table["s4"].state is StepState.NOT_STARTED
    assert table["s4"].attempts == 0
    assert len(result.errors) == 1
    error = result.errors[0]
    assert (error.step, error.action, error.type) == ("s3", "invoke", "RuntimeError")
    assert error.message == "s3 failed on attempt 1"
    assert "RuntimeError" in error.traceback
    assert "Traceback" in error.traceback
    assert "s3" in str(caught.value)
    assert "reverted" in str(caught.value)


async def test_failure_without_throw_returns_the_result(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", fail=True)

    @create_workflow("fail-nothrow")
    def wf(input: WorkflowData) -> Any:
        return s2(s1(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert result.result is None
    assert kit.log == ["s1", "s2", "c:s2", "c:s1"]


async def test_parallel_branch_failure_finishes_siblings_then_compensates_concurrently(
    make_engine, kit
) -> None:
    a_failed = anyio.Event()
    comp_started = {"b": anyio.Event(), "c": anyio.Event()}

    @create_step("pa")
    async def pa(data: Any) -> Any:
        kit.log.append("pa")
        a_failed.set()
        raise RuntimeError("branch a broke")

    def slow_branch(name: str) -> Any:
        async def invoke(data: Any) -> str:
            kit.log.append(f"run-{name}:start")
            with anyio.fail_after(2):
                await a_failed.wait()  # still running when its sibling fails
            kit.log.append(f"run-{name}:end")
            return name

        async def undo(data: Any) -> None:
            kit.log.append(f"c:{name}:start")
            comp_started[name].set()
            other = "c" if name == "b" else "b"
            with anyio.fail_after(2):  # fails if the sibling compensations ran one by one
                await comp_started[other].wait()
            kit.log.append(f"c:{name}:end")

        return create_step(f"p{name}", invoke, undo)

    pb, pc = slow_branch("b"), slow_branch("c")
    pre = kit.step("pre")
    post = kit.step("post")

    @create_workflow("parallel-fail")
    def wf(input: WorkflowData) -> Any:
        p = pre(input)
        a, b, c = parallelize(pa(p), pb(p), pc(p))
        return post({"a": a, "b": b, "c": c})

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    log = kit.log
    assert "post" not in log
    # the siblings finished before any compensation began
    first_comp = min(i for i, e in enumerate(log) if e.startswith("c:"))
    assert {"run-b:end", "run-c:end"} <= set(log[:first_comp])
    # both sibling compensations started before either ended
    starts = [log.index("c:b:start"), log.index("c:c:start")]
    ends = [log.index("c:b:end"), log.index("c:c:end")]
    assert max(starts) < min(ends)
    # pre is compensated last, after every branch
    assert log[-1] == "c:pre"
    table = result.step_table
    assert {table[n].state for n in ("pre", "pa", "pb", "pc")} == {StepState.REVERTED}


async def test_step_after_parallel_block_failing_compensates_branches_after_it(
    make_engine, kit
) -> None:
    pre = kit.step("pre")
    p1, p2, p3 = kit.step("p1"), kit.step("p2"), kit.step("p3")
    post = kit.step("post", fail=True)

    @create_workflow("after-parallel-fail")
    def wf(input: WorkflowData) -> Any:
        x = pre(input)
        a, b, c = parallelize(p1(x), p2(x), p3(x))
        return post({"a": a, "b": b, "c": c})

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    comps = [e for e in kit.log if e.startswith("c:")]
    # Medusa compensates p1, p2 before post; here every branch waits for post's compensation
    assert comps[0] == "c:post"
    assert sorted(comps[1:4]) == ["c:p1", "c:p2", "c:p3"]
    assert comps[4:] == ["c:pre"]


async def test_retries_then_success_counts_attempts(make_engine, kit) -> None:
    flaky = kit.step("flaky", fail=2, max_retries=3)

    @create_workflow("retry-ok")
    def wf(input: WorkflowData) -> Any:
        return flaky(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input="x")

    assert result.state is TransactionState.DONE
    assert kit.attempts["flaky"] == [1, 2, 3]
    assert result.step_table["flaky"].attempts == 3
    assert result.step_table["flaky"].state is StepState.DONE
    assert result.errors == ()
    assert kit.log == ["flaky", "flaky", "flaky"]


async def test_retries_exhausted_records_error_and_compensates(make_engine, kit) -> None:
    first = kit.step("first")
    flaky = kit.step("flaky", fail=True, max_retries=2)

    @create_workflow("retry-exhausted")
    def wf(input: WorkflowData) -> Any:
        return flaky(first(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(wf)

    result = caught.value.result
    assert kit.attempts["flaky"] == [1, 2, 3]
    assert kit.log == ["first", "flaky", "flaky", "flaky", "c:flaky", "c:first"]
    assert result.state is TransactionState.REVERTED
    assert result.step_table["flaky"].attempts == 3
    assert len(result.errors) == 1
    assert result.errors[0].step == "flaky"
    assert result.errors[0].message == "flaky failed on attempt 3"


async def test_retry_interval_with_backoff(make_engine, kit) -> None:
    times: list[float] = []

    @create_step("backoff", max_retries=3, retry_interval=0.02, retry_backoff=2.0)
    async def backoff(data: Any, ctx: StepContext) -> int:
        times.append(anyio.current_time())
        if ctx.attempt < 4:
            raise RuntimeError(f"attempt {ctx.attempt}")
        return ctx.attempt

    @create_workflow("retry-backoff")
    def wf(input: WorkflowData) -> Any:
        return backoff(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf)

    assert result.state is TransactionState.DONE
    assert result.result == 4
    assert result.step_table["backoff"].attempts == 4
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g > 0 for g in gaps)
    assert sum(gaps) >= 0.1  # 0.02 + 0.04 + 0.08, give or take the clock


async def test_permanent_failure_skips_retries_and_passes_compensate_input(
    make_engine, kit
) -> None:
    first = kit.step("first")
    calls: list[int] = []
    received: list[Any] = []

    @create_step("perm", max_retries=5)
    async def perm(data: Any, ctx: StepContext) -> None:
        calls.append(ctx.attempt)
        StepResponse.permanent_failure("card declined", compensate_input={"undo": "hold-1"})

    @perm.compensate
    async def undo_perm(data: Any) -> None:
        received.append(data)

    @create_workflow("permanent")
    def wf(input: WorkflowData) -> Any:
        return perm(first(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert calls == [1]
    assert received == [{"undo": "hold-1"}]
    assert kit.log == ["first", "c:first"]
    assert result.state is TransactionState.REVERTED
    assert result.errors[0].type == "PermanentFailure"
    assert result.errors[0].message == "card declined"
    assert result.step_table["perm"].attempts == 1


async def test_continue_on_permanent_failure(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", fail=True, continue_on_permanent_failure=True)
    s3 = kit.step("s3")

    @create_workflow("continue")
    def wf(input: WorkflowData) -> Any:
        a = s1(input)
        b = s2(a)
        return {"b": b, "c": s3(b)}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input=0)  # throw_on_error=True: done does not raise

    assert result.state is TransactionState.DONE
    assert kit.log == ["s1", "s2", "s3"]
    assert result.result == {"b": None, "c": {"step": "s3", "input": None}}
    assert result.step_table["s2"].state is StepState.FAILED
    assert result.step_table["s3"].state is StepState.DONE
    assert [(e.step, e.action) for e in result.errors] == [("s2", "invoke")]


async def test_skip_on_permanent_failure_true(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", fail=True, skip_on_permanent_failure=True)
    s3, s4 = kit.step("s3"), kit.step("s4")

    @create_workflow("skip-true")
    def wf(input: WorkflowData) -> Any:
        return s4(s3(s2(s1(input))))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf)

    assert kit.log == ["s1", "s2"]
    assert result.state is TransactionState.DONE
    table = result.step_table
    assert table["s1"].state is StepState.DONE
    assert table["s2"].state is StepState.FAILED
    assert table["s3"].state is StepState.SKIPPED_FAILURE
    assert table["s4"].state is StepState.SKIPPED_FAILURE
    assert [e.step for e in result.errors] == ["s2"]


async def test_skip_on_permanent_failure_resumes_at_named_step(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", fail=True, skip_on_permanent_failure="s4")
    s3, s4, s5 = kit.step("s3"), kit.step("s4"), kit.step("s5")

    @create_workflow("skip-named")
    def wf(input: WorkflowData) -> Any:
        return s5(s4(s3(s2(s1(input)))))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf)

    assert kit.log == ["s1", "s2", "s4", "s5"]
    assert result.state is TransactionState.DONE
    table = result.step_table
    assert table["s3"].state is StepState.SKIPPED_FAILURE
    assert table["s4"].state is StepState.DONE
    assert table["s5"].state is StepState.DONE
    assert result.result == {"step": "s5", "input": {"step": "s4", "input": None}}


async def test_compensation_that_keeps_failing_leaves_run_failed(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", comp_fail=True, max_retries=1)
    s3 = kit.step("s3", fail=True)

    @create_workflow("comp-fails")
    def wf(input: WorkflowData) -> Any:
        return s3(s2(s1(input)))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(wf)

    result = caught.value.result
    assert result.state is TransactionState.FAILED
    # s3 invoke is not retried (max_retries 0); s2's compensation runs twice; s1 still undone
    assert kit.log == ["s1", "s2", "s3", "c:s3", "c:s2", "c:s2", "c:s1"]
    table = result.step_table
    assert table["s2"].state is StepState.FAILED
    assert table["s2"].compensate_attempts == 2
    assert table["s1"].state is StepState.REVERTED
    assert table["s3"].state is StepState.REVERTED
    kinds = [(e.step, e.action, e.type) for e in result.errors]
    assert kinds == [("s3", "invoke", "RuntimeError"), ("s2", "compensate", "RuntimeError")]
    comp_error = result.errors[1]
    assert comp_error.message == "compensation of s2 failed on attempt 2"
    assert "RuntimeError" in comp_error.traceback


async def test_compensation_retried_then_succeeding(make_engine, kit) -> None:
    s1 = kit.step("s1", comp_fail=1, max_retries=2)
    s2 = kit.step("s2", fail=True)

    @create_workflow("comp-retry")
    def wf(input: WorkflowData) -> Any:
        return s2(s1(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["s1", "s2", "c:s2", "c:s1", "c:s1"]
    assert result.step_table["s1"].compensate_attempts == 2
    assert result.step_table["s1"].state is StepState.REVERTED
    assert [(e.step, e.action) for e in result.errors] == [("s2", "invoke")]


async def test_step_without_compensation_is_not_compensated(make_engine, kit) -> None:
    s1 = kit.step("s1")
    s2 = kit.step("s2", compensate=False)
    s3 = kit.step("s3", fail=True)

    @create_workflow("no-comp")
    def wf(input: WorkflowData) -> Any:
        return s3(s2(s1(input)))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert kit.log == ["s1", "s2", "s3", "c:s3", "c:s1"]
