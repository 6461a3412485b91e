"""Behaviour: bad input at run time and composition errors at definition time."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import msgspec
import pytest

from orchestrator import (
    CompositionError,
    ConfigurationError,
    OrchestratorError,
    StepContext,
    StepState,
    TransactionNotFoundError,
    TransactionState,
    UnknownWorkflowError,
    WorkflowData,
    WorkflowFailedError,
    create_step,
    create_workflow,
    transform,
    when,
)

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: str
    qty: int


@dataclasses.dataclass
class Parcel:
    weight: float
    label: str = "none"


# ------------------------------------------------------------------------------ typed input
async def test_struct_and_dataclass_inputs_are_converted(make_engine, kit) -> None:
    seen: list[Any] = []

    @create_step("typed-order")
    async def typed_order(order: Order, ctx: StepContext) -> int:
        seen.append(order)
        return order.qty * 2

    @create_step("typed-parcel")
    def typed_parcel(parcel: Parcel) -> str:
        seen.append(parcel)
        return f"{parcel.label}:{parcel.weight}"

    @create_workflow("typed")
    def wf(input: WorkflowData) -> Any:
        return {"qty": typed_order(input.order), "parcel": typed_parcel(input.parcel)}

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            result = await engine.run(
                wf, input={"order": {"id": "o1", "qty": 3}, "parcel": {"weight": 1.5}}
            )

    assert result.result == {"qty": 6, "parcel": "none:1.5"}
    assert seen == [Order(id="o1", qty=3), Parcel(weight=1.5)]


async def test_typed_input_mismatch_is_a_permanent_failure(make_engine, kit) -> None:
    calls: list[int] = []

    @create_step("typed-order", max_retries=3)
    async def typed_order(order: Order, ctx: StepContext) -> int:
        calls.append(ctx.attempt)
        return order.qty

    @create_workflow("typed-bad")
    def wf(input: WorkflowData) -> Any:
        return typed_order(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(wf, input={"id": "o1", "qty": "three"})

    result = caught.value.result
    assert calls == []  # the handler never ran, and nothing was retried
    assert result.state is TransactionState.REVERTED
    assert result.step_table["typed-order"].attempts == 1
    error = result.errors[0]
    assert error.type == "PermanentFailure"
    assert "typed-order" in error.message
    assert "Order" in error.message
    assert "qty" in error.message


# ------------------------------------------------------------------------------ bad values
async def test_unencodable_step_output_fails_the_step(make_engine, kit) -> None:
    first = kit.step("first")

    @create_step("returns-object", max_retries=2)
    async def returns_object(data: Any) -> Any:
        kit.log.append("returns-object")
        return {"thing": object()}

    @create_workflow("bad-output")
    def wf(input: WorkflowData) -> Any:
        return returns_object(first(input))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(WorkflowFailedError) as caught:
            await engine.run(wf)

    result = caught.value.result
    assert result.state is TransactionState.REVERTED
    assert kit.log == ["first", "returns-object", "c:first"]  # not retried: it can never work
    error = result.errors[0]
    assert error.step == "returns-object"
    assert error.type == "StepOutputError"
    assert "returns-object" in error.message
    assert "object" in error.message


async def test_unencodable_workflow_input_is_rejected(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("bad-input")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5), pytest.raises(ConfigurationError, match="input"):
            await engine.run(wf, input={"x": object()})

    assert kit.log == []


async def test_unknown_workflow_name(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("known-one")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf]) as engine:
        with pytest.raises(UnknownWorkflowError) as caught:
            await engine.run("nope", input=1)
        with pytest.raises(UnknownWorkflowError):
            await engine.start("nope")

    assert "nope" in str(caught.value)
    assert "known-one" in str(caught.value)
    assert isinstance(caught.value, OrchestratorError)


async def test_unknown_transaction_and_idempotency_key(make_engine, kit) -> None:
    s = kit.step("s", async_=True, output=None)

    @create_workflow("keys")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf]) as engine:
        with anyio.fail_after(5):
            with pytest.raises(TransactionNotFoundError):
                await engine.get("no-such-tx")
            with pytest.raises(TransactionNotFoundError):
                await engine.cancel("no-such-tx")
            with pytest.raises(TransactionNotFoundError):
                await engine.set_step_success("keys:no-such-tx:s:invoke", 1)
            with pytest.raises(TransactionNotFoundError):
                await engine.set_step_failure("totally-unknown-key", "x")
            with pytest.raises(TransactionNotFoundError):
                await engine.retry_step("keys:no-such-tx:s:invoke")


# ------------------------------------------------------------------------------ composition
@pytest.mark.parametrize(
    ("what", "misuse"),
    [
        pytest.param("bool()", lambda v: bool(v), id="bool()"),
        pytest.param("if", lambda v: 1 if v else 0, id="if"),
        pytest.param("len()", lambda v: len(v), id="len()"),
        pytest.param("iteration", lambda v: list(v), id="iteration"),
        pytest.param("unpacking", lambda v: [*v], id="unpacking"),
        pytest.param("in", lambda v: 1 in v, id="in"),
        pytest.param("+", lambda v: v + 1, id="+"),
        pytest.param("radd", lambda v: 1 + v, id="radd"),
        pytest.param("*", lambda v: v * 2, id="*"),
        pytest.param("==", lambda v: v == 1, id="=="),
        pytest.param("!=", lambda v: v != 1, id="!="),
        pytest.param("<", lambda v: v < 1, id="<"),
        pytest.param(">=", lambda v: v >= 1, id=">="),
        pytest.param("int()", lambda v: int(v), id="int()"),
        pytest.param("unary -", lambda v: -v, id="unary -"),
    ],
)
def test_proxy_misuse_is_a_composition_error(what: str, misuse: Any) -> None:
    def composer(input: WorkflowData) -> Any:
        misuse(input.total)
        return None

    with pytest.raises(CompositionError) as caught:
        create_workflow(f"misuse-{what}", composer)

    message = str(caught.value)
    assert "transform" in message
    assert "when" in message


def test_duplicate_step_names_are_rejected(kit) -> None:
    s = kit.step("dup")

    with pytest.raises(CompositionError, match="dup"):

        @create_workflow("dup-wf")
        def wf(input: WorkflowData) -> Any:
            return s(s(input))


def test_two_steps_with_the_same_name_are_rejected(kit) -> None:
    a, b = kit.step("same"), kit.step("same")

    with pytest.raises(CompositionError, match="same"):
        create_workflow("same-wf", lambda input: b(a(input)))


def test_step_called_outside_a_composer(kit) -> None:
    s = kit.step("loose")
    with pytest.raises(CompositionError, match="composer"):
        s({"x": 1})
    with pytest.raises(CompositionError):
        transform({"x": 1}, lambda v: v)
    with pytest.raises(CompositionError):
        when({"x": 1}, lambda v: True)


@pytest.mark.parametrize(
    "returned", [lambda: 1, object(), {"fn": print}], ids=["lambda", "object", "function-in-dict"]
)
def test_composer_returning_something_unencodable(returned: Any) -> None:
    with pytest.raises(CompositionError, match="transform"):
        create_workflow("returns-junk", lambda input: returned)


async def test_config_name_makes_reuse_legal(make_engine, kit) -> None:
    s = kit.step("reused")

    wf = create_workflow("reused-wf", lambda input: s(s(input).config(name="reused-2")))

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            result = await engine.run(wf, input=0)
    assert [info.name for info in result.steps] == ["reused-2", "reused"]
    assert result.result == {"step": "reused", "input": {"step": "reused", "input": 0}}


async def test_result_from_unknown_step(make_engine, kit) -> None:
    s = kit.step("s")

    @create_workflow("rf-bad")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf], container=kit.container) as engine:
        with pytest.raises(ConfigurationError, match="nope"):
            await engine.run(wf, result_from="nope")


async def test_external_completion_of_a_step_not_awaiting(make_engine, kit) -> None:
    from orchestrator import StepNotAwaitingError

    s = kit.step("s")

    @create_workflow("not-awaiting")
    def wf(input: WorkflowData) -> Any:
        return s(input)

    async with make_engine([wf], container=kit.container) as engine:
        with anyio.fail_after(5):
            done = await engine.run(wf, transaction_id="na-1")
            with pytest.raises(StepNotAwaitingError):
                await engine.set_step_success("not-awaiting:na-1:s:invoke", 1)
            after = await engine.get("na-1")

    assert done.state is TransactionState.DONE
    assert after.step_table["s"].state is StepState.DONE
    assert kit.log == ["s"]
