"""Behaviour: runs that succeed (order, results, step tables, composition helpers)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from orchestrator import (
    StepContext,
    StepResponse,
    StepState,
    TransactionState,
    WorkflowData,
    WorkflowResponse,
    create_step,
    create_workflow,
    parallelize,
    transform,
    when,
)

pytestmark = pytest.mark.anyio


async def test_linear_success_result_states_attempts_and_timestamps(make_engine, kit) -> None:
    s1, s2, s3 = kit.step("s1"), kit.step("s2"), kit.step("s3")

    @create_workflow("linear")
    def linear(input: WorkflowData) -> Any:
        a = s1(input)
        b = s2(a)
        c = s3(b)
        return {"first": a, "last": c}

    async with make_engine([linear], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run("linear", input={"n": 1}, transaction_id="tx-linear")

    assert kit.log == ["s1", "s2", "s3"]
    assert result.state is TransactionState.DONE
    assert result.transaction_id == "tx-linear"
    assert result.workflow == "linear"
    assert result.errors == ()
    assert result.result == {
        "first": {"step": "s1", "input": {"n": 1}},
        "last": {"step": "s3", "input": {"step": "s2", "input": {"step": "s1", "input": {"n": 1}}}},
    }
    assert [s.name for s in result.steps] == ["s1", "s2", "s3"]
    table = result.step_table
    for name in ("s1", "s2", "s3"):
        info = table[name]
        assert info.state is StepState.DONE
        assert info.attempts == 1
        assert info.compensate_attempts == 0
        assert info.started_at is not None
        assert info.finished_at is not None
        assert info.started_at <= info.finished_at
        assert info.duration is not None
        assert info.duration >= 0
    assert table["s1"].finished_at <= table["s2"].started_at
    assert table["s2"].finished_at <= table["s3"].started_at
    assert result.created_at is not None
    assert result.finished_at is not None
    assert result.created_at <= table["s1"].started_at
    assert table["s3"].finished_at <= result.finished_at


async def test_parallelize_runs_branches_concurrently_and_joins(make_engine, kit) -> None:
    both_started = {"a": anyio.Event(), "b": anyio.Event()}

    async def branch(name: str, other: str, data: Any) -> dict[str, Any]:
        kit.log.append(f"{name}:start")
        both_started[name].set()
        with anyio.fail_after(2):  # deadlocks (and fails) if the branches ran one by one
            await both_started[other].wait()
        kit.log.append(f"{name}:end")
        return {name: data["v"]}

    async def run_a(data: Any) -> Any:
        return await branch("a", "b", data)

    async def run_b(data: Any) -> Any:
        return await branch("b", "a", data)

    step_a, step_b = create_step("pa", run_a), create_step("pb", run_b)
    after = kit.step("after")

    @create_workflow("parallel-ok")
    def wf(input: WorkflowData) -> Any:
        a, b = parallelize(step_a(input), step_b(input))
        return after({"a": a, "b": b})

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await wf(engine).run(input={"v": 7})

    assert result.state is TransactionState.DONE
    assert result.result == {"step": "after", "input": {"a": {"a": 7}, "b": {"b": 7}}}
    assert set(kit.log[:2]) == {"a:start", "b:start"}
    assert kit.log[-1] == "after"


async def test_when_true_runs_block_and_resolves_its_value(make_engine, kit) -> None:
    gift = kit.step("gift")
    tail = kit.step("tail")

    @create_workflow("when-true")
    def wf(input: WorkflowData) -> Any:
        g = when(input, lambda i: i["total"] > 100).then(lambda: gift(input))
        t = tail(g)
        return {"gift": g, "tail": t}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input={"total": 150})

    assert result.state is TransactionState.DONE
    assert kit.log == ["gift", "tail"]
    assert result.result["gift"] == {"step": "gift", "input": {"total": 150}}
    assert result.step_table["gift"].state is StepState.DONE


async def test_when_false_skips_block_and_resolves_none(make_engine, kit) -> None:
    gift = kit.step("gift")
    wrap = kit.step("wrap")
    tail = kit.step("tail")

    @create_workflow("when-false")
    def wf(input: WorkflowData) -> Any:
        g = when(input, lambda i: i["total"] > 100).then(lambda: wrap(gift(input)))
        t = tail(g)
        return {"gift": g, "tail": t}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input={"total": 50})

    assert result.state is TransactionState.DONE
    assert kit.log == ["tail"]  # neither block step was invoked
    assert result.result == {"gift": None, "tail": {"step": "tail", "input": None}}
    assert result.step_table["gift"].state is StepState.SKIPPED
    assert result.step_table["wrap"].state is StepState.SKIPPED
    assert result.step_table["gift"].attempts == 0


async def test_named_and_unnamed_when_blocks_are_decided_separately(make_engine, kit) -> None:
    big, small, always = kit.step("big"), kit.step("small"), kit.step("always")
    predicates: list[str] = []

    def is_big(i: Any) -> bool:
        predicates.append("is-big")
        return i["n"] > 10

    def is_small(i: Any) -> bool:
        predicates.append("is-small")
        return i["n"] <= 10

    @create_workflow("when-named")
    def wf(input: WorkflowData) -> Any:
        b = when("is-big", input, is_big).then(lambda: big(input))
        s = when(input, is_small).then(lambda: small(input))
        a = always(input)
        return {"big": b, "small": s, "always": a["step"]}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            small_run = await engine.run(wf, input={"n": 3})
            big_run = await engine.run(wf, input={"n": 30})

    assert small_run.result == {
        "big": None,
        "small": {"step": "small", "input": {"n": 3}},
        "always": "always",
    }
    assert big_run.result == {
        "big": {"step": "big", "input": {"n": 30}},
        "small": None,
        "always": "always",
    }
    assert kit.log == ["small", "always", "big", "always"]
    assert predicates.count("is-big") == 2
    assert predicates.count("is-small") == 2


async def test_transform_pipeline_over_several_step_outputs(make_engine, kit) -> None:
    price = kit.step("price", output={"amount": 40})
    tax = kit.step("tax", output={"rate": 0.25})
    charge = kit.step("charge")

    @create_workflow("transform-chain")
    def wf(input: WorkflowData) -> Any:
        p = price(input)
        t = tax(input)
        total = transform(
            {"p": p, "t": t, "qty": input.qty},
            lambda v: v["p"]["amount"] * v["qty"],
            lambda sub: {"sub": sub},
            lambda d: {**d, "total": d["sub"] * 1.25},
        )
        c = charge(total)
        label = transform(c, lambda out: out["input"]["total"], lambda x: f"total={x}")
        return {"total": total, "label": label}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input={"qty": 2})

    assert result.state is TransactionState.DONE
    assert result.result == {"total": {"sub": 80, "total": 100.0}, "label": "total=100.0"}
    assert kit.log == ["price", "tax", "charge"]
    # a transform is not a step
    assert [s.name for s in result.steps] == ["price", "tax", "charge"]


async def test_step_response_skip_marks_step_skipped(make_engine, kit) -> None:
    async def maybe(data: Any, ctx: StepContext) -> Any:
        kit.log.append("maybe")
        return StepResponse.skip()

    maybe_step = create_step("maybe", maybe)
    after = kit.step("after")

    @create_workflow("skip-step")
    def wf(input: WorkflowData) -> Any:
        m = maybe_step(input)
        return {"maybe": m, "after": after(m)}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input=1)

    assert result.state is TransactionState.DONE
    assert result.step_table["maybe"].state is StepState.SKIPPED
    assert result.result == {"maybe": None, "after": {"step": "after", "input": None}}
    assert kit.log == ["maybe", "after"]


async def test_step_context_fields(make_engine, kit) -> None:
    seen: dict[str, Any] = {}

    @create_step("ctx-step")
    async def inspect_ctx(data: Any, ctx: StepContext) -> str:
        seen.update(
            workflow_id=ctx.workflow_id,
            step_name=ctx.step_name,
            action=ctx.action,
            transaction_id=ctx.transaction_id,
            idempotency_key=ctx.idempotency_key,
            attempt=ctx.attempt,
            service=ctx.container.resolve("service"),
            context=dict(ctx.context),
        )
        ctx.log.debug("inspecting the context", extra_field=1)
        return "ok"

    @create_workflow("ctx-wf")
    def wf(input: WorkflowData) -> Any:
        return inspect_ctx(input)

    async with make_engine([wf], container={"service": "the-service"}) as engine:
        with anyio.fail_after(5):
            result = await engine.run(
                wf, input=None, transaction_id="tx:with:colons", context={"user": "u1"}
            )

    assert result.state is TransactionState.DONE
    assert seen == {
        "workflow_id": "ctx-wf",
        "step_name": "ctx-step",
        "action": "invoke",
        "transaction_id": "tx:with:colons",
        "idempotency_key": "ctx-wf:tx:with:colons:ctx-step:invoke",
        "attempt": 1,
        "service": "the-service",
        "context": {"user": "u1"},
    }


async def test_compensation_context_has_action_compensate(make_engine, kit) -> None:
    seen: list[tuple[str, str, int]] = []

    @create_step("recorded")
    async def recorded(data: Any, ctx: StepContext) -> int:
        seen.append((ctx.action, ctx.idempotency_key, ctx.attempt))
        return 1

    @recorded.compensate
    async def undo(data: Any, ctx: StepContext) -> None:
        seen.append((ctx.action, ctx.idempotency_key, ctx.attempt))

    boom = kit.step("boom", fail=True)

    @create_workflow("ctx-comp")
    def wf(input: WorkflowData) -> Any:
        return boom(recorded(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, transaction_id="t1", throw_on_error=False)

    assert result.state is TransactionState.REVERTED
    assert seen == [
        ("invoke", "ctx-comp:t1:recorded:invoke", 1),
        ("compensate", "ctx-comp:t1:recorded:compensate", 1),
    ]


async def test_handler_forms_sync_thread_one_arg_and_typed_input(make_engine, kit) -> None:
    main_thread = threading.get_ident()
    threads: dict[str, int] = {}

    def plain(data: Any, ctx: StepContext) -> dict[str, Any]:
        threads["plain"] = threading.get_ident()
        return {"plain": data["n"] + 1, "attempt": ctx.attempt}

    async def one_arg(data: Any) -> int:
        return data["plain"] * 10

    def sync_one_arg(data: Any) -> str:
        threads["sync_one_arg"] = threading.get_ident()
        return f"v={data}"

    s_plain = create_step("plain", plain)
    s_one = create_step("one-arg", one_arg)
    s_sync_one = create_step("sync-one-arg", sync_one_arg)

    @create_workflow("handler-forms")
    def wf(input: WorkflowData) -> Any:
        p = s_plain(input)
        o = s_one(p)
        return {"plain": p, "one": o, "sync": s_sync_one(o)}

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input={"n": 1})

    assert result.state is TransactionState.DONE
    assert result.result == {"plain": {"plain": 2, "attempt": 1}, "one": 20, "sync": "v=20"}
    assert threads["plain"] != main_thread
    assert threads["sync_one_arg"] != main_thread


async def test_outputs_are_copied_per_consumer(make_engine, kit) -> None:
    @create_step("source")
    async def source(data: Any) -> dict[str, Any]:
        return {"items": [1]}

    @create_step("mutator")
    async def mutator(data: Any) -> dict[str, Any]:
        data["items"].append(2)
        data["touched"] = True
        return data

    @create_step("reader")
    async def reader(data: Any) -> dict[str, Any]:
        return {"seen": data}

    @create_step("path-mutator")
    async def path_mutator(items: Any) -> list[int]:
        items.append(99)
        return items

    @create_step("path-reader")
    async def path_reader(items: Any) -> list[int]:
        return list(items)

    @create_workflow("copies")
    def wf(input: WorkflowData) -> Any:
        s = source(input)
        m, r = parallelize(mutator(s), reader(s))
        pm = path_mutator(s["items"])
        pr = path_reader(s["items"])
        seen_by_transform = transform(s, lambda v: list(v["items"]))
        return {
            "source": s,
            "mutated": m,
            "read": r,
            "pm": pm,
            "pr": pr,
            "tf": seen_by_transform,
        }

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf)

    assert result.state is TransactionState.DONE
    out = result.result
    assert out["source"] == {"items": [1]}
    assert out["mutated"] == {"items": [1, 2], "touched": True}
    assert out["read"] == {"seen": {"items": [1]}}
    assert out["pm"] == [1, 99]
    assert out["pr"] == [1]
    assert out["tf"] == [1]


async def test_result_from_returns_that_steps_output(make_engine, kit) -> None:
    s1, s2 = kit.step("s1", output={"one": 1}), kit.step("s2", output={"two": 2})

    @create_workflow("result-from")
    def wf(input: WorkflowData) -> Any:
        s2(s1(input))
        return {"whole": "result"}

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            default = await engine.run(wf)
            from_s1 = await wf(engine).run(result_from="s1")

    assert default.result == {"whole": "result"}
    assert from_s1.result == {"one": 1}
    assert from_s1.state is TransactionState.DONE


async def test_bound_workflow_run_and_workflow_response(make_engine, kit) -> None:
    s1 = kit.step("s1", output=5)

    @create_workflow("bound")
    def wf(input: WorkflowData) -> WorkflowResponse:
        return WorkflowResponse({"value": s1(input), "name": input.name})

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await wf(engine).run(input={"name": "x"}, transaction_id="bound-1")
            again = await engine.get("bound-1")

    assert result.result == {"value": 5, "name": "x"}
    assert again.result == result.result
    assert again.state is TransactionState.DONE


async def test_config_rename_allows_reusing_a_step(make_engine, kit) -> None:
    add = kit.step("add")

    @create_workflow("reuse")
    def wf(input: WorkflowData) -> Any:
        first = add(input)
        second = add(first).config(name="add-again")
        return second

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input=0)

    assert [s.name for s in result.steps] == ["add", "add-again"]
    assert kit.log == ["add", "add"]
    assert result.result == {"step": "add", "input": {"step": "add", "input": 0}}
