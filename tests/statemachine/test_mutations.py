"""The tests can fail: broken machines (wrapped around the real one) are caught.

Each test swaps the driver's ``apply`` for a wrapper that breaks one rule, then checks that the
property test (generation only, no shrinking) or the oracle on an example catches it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orchestrator._codec import NONE
from orchestrator._composer import create_workflow
from orchestrator._graph import Graph
from orchestrator._step import create_step
from orchestrator._transaction import Event, Finished, Invoke, StepDone, TxState
from orchestrator._transaction import apply as real_apply

from . import driver as driver_module
from .driver import Driver
from .oracle import check_run
from .test_properties import Case, cases, run_case

Apply = Callable[[Graph, TxState, Event], tuple[TxState, list[Any]]]


def _step(name: str, **config: Any) -> Any:
    return create_step(name, _noop, _noop, **config)


def _noop(data: Any, ctx: Any) -> Any:
    return data


def _property_fails(monkeypatch: pytest.MonkeyPatch, broken: Apply) -> None:
    monkeypatch.setattr(driver_module, "apply", broken)

    @settings(
        max_examples=1000,  # each broken machine is caught within ~40-200 examples
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=cases(), rng=st.randoms(use_true_random=False))
    def prop(case: Case, rng: Any) -> None:
        run_case(case, rng)

    with pytest.raises(AssertionError):
        prop()


def test_compensating_out_of_order_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(graph: Graph, state: TxState, event: Event) -> Any:
        blind = copy.copy(graph)  # the machine forgets what ran after what
        blind.successors = {k: frozenset() for k in graph.successors}
        return real_apply(blind, state, event)

    wf = create_workflow("w", lambda inp: _step("c")(_step("b")(_step("a")(inp))))
    monkeypatch.setattr(driver_module, "apply", broken)
    d = Driver(wf, {"c": ["perm"]}).run()
    wrong_order = r"compensated \(at \d+\) before [bc] finished compensating"
    with pytest.raises(AssertionError, match=wrong_order):
        check_run(d)
    _property_fails(monkeypatch, broken)


def test_accepting_a_stale_attempt_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(graph: Graph, state: TxState, event: Event) -> Any:
        if isinstance(event, StepDone) and event.step in state.steps:
            record = state.steps[event.step]  # answer whatever attempt is current
            event = msgspec.structs.replace(event, attempt=record.attempt)
        return real_apply(graph, state, event)

    wf = create_workflow("w", lambda inp: _step("a", max_retries=1)(inp))
    monkeypatch.setattr(driver_module, "apply", broken)
    d = Driver(wf, {"a": ["fail"]}).start()
    d.step()  # attempt 1 fails, attempt 2 runs
    stale = StepDone(now=5.0, step="a", attempt=1)
    with pytest.raises(AssertionError, match="stale event changed the state"):
        d.apply(d.root_id, stale, "stale")
    _property_fails(monkeypatch, broken)


def test_an_impure_apply_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(graph: Graph, state: TxState, event: Event) -> Any:
        new, commands = real_apply(graph, state, event)
        state.version = new.version  # writes through to the old state
        return new, commands

    wf = create_workflow("w", lambda inp: _step("a")(inp))
    monkeypatch.setattr(driver_module, "apply", broken)
    with pytest.raises(AssertionError, match="modified the old state"):
        Driver(wf).run()


def test_a_wrong_final_state_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(graph: Graph, state: TxState, event: Event) -> Any:
        new, commands = real_apply(graph, state, event)
        if new.status == "failed":  # pretends every compensation worked
            new.status = "reverted"
            commands = [
                Finished(state="reverted") if isinstance(c, Finished) else c for c in commands
            ]
        return new, commands

    wf = create_workflow("w", lambda inp: _step("b")(_step("a")(inp)))
    monkeypatch.setattr(driver_module, "apply", broken)
    d = Driver(wf, {"b": ["perm"]}, {"a": ["perm"]}).run()
    with pytest.raises(AssertionError):
        check_run(d)
    _property_fails(monkeypatch, broken)


def test_extra_retries_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def more_retries(graph: Graph) -> Graph:
        nodes = tuple(
            msgspec.structs.replace(
                n, config=msgspec.structs.replace(n.config, max_retries=n.config.max_retries + 1)
            )
            for n in graph.nodes
        )
        return Graph(graph.name, nodes, graph.whens, graph.result, graph.hook_handlers)

    def broken(graph: Graph, state: TxState, event: Event) -> Any:
        return real_apply(more_retries(graph), state, event)

    _property_fails(monkeypatch, broken)


def test_a_forward_step_started_during_compensation_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(graph: Graph, state: TxState, event: Event) -> Any:
        new, commands = real_apply(graph, state, event)
        if state.status == "compensating":  # a late forward dispatch
            for node in graph.nodes:
                if new.steps[node.name].state == "not_started":
                    invoke = Invoke(step=node.name, action="invoke", attempt=1, input=NONE)
                    return new, [*commands, invoke]
        return new, commands

    a, b, c = _step("a"), _step("b"), _step("c")
    wf = create_workflow("w", lambda inp: c(b(a(inp))))
    monkeypatch.setattr(driver_module, "apply", broken)
    d = Driver(wf, {"b": ["perm"]}).run()
    with pytest.raises(AssertionError, match=r"\('compensating', \[Invoke\(step='c'"):
        check_run(d)
    _property_fails(monkeypatch, broken)


def test_a_failure_that_does_not_stop_the_run_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def carry_on(graph: Graph) -> Graph:
        nodes = tuple(
            msgspec.structs.replace(
                n, config=msgspec.structs.replace(n.config, continue_on_permanent_failure=True)
            )
            for n in graph.nodes
        )
        return Graph(graph.name, nodes, graph.whens, graph.result, graph.hook_handlers)

    def broken(graph: Graph, state: TxState, event: Event) -> Any:
        return real_apply(carry_on(graph), state, event)

    _property_fails(monkeypatch, broken)
