"""Example-based tests of the transaction state machine (driven directly, no actors)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator._codec import NONE, decode, encode
from orchestrator._composer import create_workflow, parallelize, when
from orchestrator._step import create_step
from orchestrator._transaction import (
    Abort,
    Begin,
    Cancel,
    CancelChild,
    Complete,
    Finished,
    Invoke,
    Reject,
    RetryStep,
    SetTimer,
    StepDone,
    StepFailed,
    TimerFired,
    apply,
    is_settled,
    new_state,
    to_result,
)
from orchestrator._types import StepError, StepState, TransactionState

from .driver import Driver
from .oracle import check_run


def step(name: str, compensate: bool = True, **config: Any) -> Any:
    return create_step(name, _noop, _noop if compensate else None, **config)


def _noop(data: Any, ctx: Any) -> Any:
    return data


def states(d: Driver, tx: str | None = None) -> dict[str, str]:
    t = d.txs[tx or d.root_id]
    return {s.name: s.state.value for s in to_result(t.state, t.graph).steps}


def deliver(d: Driver, name: str, action: str = "invoke") -> None:
    """Deliver the outstanding result of ``name`` (whatever the FIFO order says)."""
    for i, item in enumerate(d.pending):
        if item.key is not None and item.key[1:3] == (name, action):
            d.deliver(d.pending.pop(i))
            return
    raise AssertionError(f"no outstanding {action} result for {name}")


def fire(d: Driver, kind: str) -> None:
    """Fire the pending timer of ``kind``."""
    for i, item in enumerate(d.timers):
        assert isinstance(item.event, TimerFired)
        if item.event.kind == kind:
            d.deliver(d.timers.pop(i))
            return
    raise AssertionError(f"no {kind} timer")


def chain(*names: str, **config: Any) -> Any:
    steps = [step(n, **config) for n in names]

    def composer(inp: Any) -> Any:
        value = inp
        for s in steps:
            value = s(value)
        return value

    return create_workflow("chain", composer)


# ---------------------------------------------------------------------------------- basics
def test_a_chain_runs_in_order_and_ends_done() -> None:
    d = Driver(chain("a", "b", "c")).run({"x": 1})
    assert d.trace() == [("invoke", "a"), ("invoke", "b"), ("invoke", "c")]
    assert d.root.state.status == "done"
    assert d.root.finished == ["done"]
    assert decode(d.root.state.result) == {"step": "c", "attempt": 1}
    # each step gets the previous one's output
    inputs = [decode(c.input) for c in d.invokes_of()]
    assert inputs == [{"x": 1}, {"step": "a", "attempt": 1}, {"step": "b", "attempt": 1}]
    check_run(d)


def test_a_failure_compensates_in_reverse_order_the_failed_step_included() -> None:
    d = Driver(chain("a", "b", "c"), {"c": ["perm"]}).run()
    assert d.trace() == [
        ("invoke", "a"),
        ("invoke", "b"),
        ("invoke", "c"),
        ("compensate", "c"),
        ("compensate", "b"),
        ("compensate", "a"),
    ]
    comp = {c.step: decode(c.input) for c in d.invokes_of(action="compensate")}
    assert comp == {
        "c": None,
        "b": {"step": "b", "attempt": 1},
        "a": {"step": "a", "attempt": 1},
    }
    assert d.root.state.status == "reverted"
    assert states(d) == {"a": "reverted", "b": "reverted", "c": "reverted"}
    check_run(d)


def test_compensate_input_of_step_response_and_of_a_permanent_failure() -> None:
    d = Driver(chain("a", "b"), {"b": ["perm"]}, custom_comp={"a", "b"}).run()
    comp = {c.step: decode(c.input) for c in d.invokes_of(action="compensate")}
    assert comp == {"a": {"undo": "a"}, "b": {"perm": "b"}}
    check_run(d)


def test_steps_without_compensation_and_skipped_steps_are_not_compensated() -> None:
    a, b, c, e = step("a"), step("b", compensate=False), step("c"), step("e")

    def composer(inp: Any) -> Any:
        x = a(inp)
        y = b(x)
        z = when(inp, lambda _: False).then(lambda: c(y))
        return e(z)

    d = Driver(create_workflow("w", composer), {"e": ["perm"]}).run()
    assert d.trace() == [
        ("invoke", "a"),
        ("invoke", "b"),
        ("invoke", "e"),
        ("compensate", "e"),
        ("compensate", "a"),
    ]
    assert decode(d.invokes_of()[2].input) is None  # the skipped block's value
    assert states(d) == {"a": "reverted", "b": "reverted", "c": "skipped", "e": "reverted"}
    check_run(d)


def test_parallel_siblings_are_compensated_concurrently_after_what_follows_them() -> None:
    a, b, c, e = step("a"), step("b"), step("c"), step("e")

    def composer(inp: Any) -> Any:
        x = a(inp)
        y, z = parallelize(b(x), c(x))
        return e([y, z])

    d = Driver(create_workflow("w", composer), {"e": ["perm"]}).run()
    comps = [(seq, c.step) for seq, _, c in d.invokes if c.action == "compensate"]
    seq_of = {name: seq for seq, name in comps}
    assert seq_of["e"] < seq_of["b"] == seq_of["c"] < seq_of["a"]  # b, c: one apply
    check_run(d)


def test_a_step_skipped_by_its_handler_is_not_compensated_and_later_steps_run() -> None:
    d = Driver(chain("a", "b", "c"), {"b": ["skip"], "c": ["perm"]}).run()
    assert [s for a, s in d.trace() if a == "compensate"] == ["c", "a"]
    assert states(d)["b"] == "skipped"
    check_run(d)


# --------------------------------------------------------------------------------- retries
def test_attempts_count_up_and_the_step_fails_for_good_after_max_retries() -> None:
    d = Driver(chain("a", "b", max_retries=2), {"b": ["fail", "timeout", "fail"]}).run()
    assert [(c.step, c.attempt) for c in d.invokes_of(action="invoke")] == [
        ("a", 1),
        ("b", 1),
        ("b", 2),
        ("b", 3),
    ]
    assert d.root.state.status == "reverted"
    (error,) = d.root.state.errors
    assert (error.step, error.action, error.attempt) == ("b", "invoke", 3)
    info = to_result(d.root.state, d.root.graph).step_table["b"]
    assert info.attempts == 3
    events = d.events()
    assert events.count("step_failure") == 3
    check_run(d)


def test_a_retry_that_succeeds_ends_done() -> None:
    d = Driver(chain("a", max_retries=2), {"a": ["fail", "fail", "ok"]}).run()
    assert [c.attempt for c in d.invokes_of()] == [1, 2, 3]
    assert d.root.state.status == "done"
    assert d.root.state.errors == []
    assert decode(d.root.state.result) == {"step": "a", "attempt": 3}
    check_run(d)


def test_a_permanent_failure_is_not_retried() -> None:
    d = Driver(chain("a", max_retries=2), {"a": ["perm"]}).run()
    assert [c.attempt for c in d.invokes_of(action="invoke")] == [1]
    assert d.root.state.status == "reverted"
    check_run(d)


def test_retry_interval_with_backoff_capped_by_max_retry_interval() -> None:
    wf = chain("a", max_retries=4, retry_interval=1.0, retry_backoff=2.0, max_retry_interval=5.0)
    d = Driver(wf, {"a": ["fail", "fail", "fail", "fail"]}).run()
    retries = [(cmd.at - now, cmd.attempt) for _, _, cmd, now in d.timers_set]
    assert retries == [(1.0, 1), (2.0, 2), (4.0, 3), (5.0, 4)]
    assert all(cmd.kind == "retry" and cmd.step == "a" for _, _, cmd, _ in d.timers_set)
    assert [c.attempt for c in d.invokes_of()] == [1, 2, 3, 4, 5]
    # each retry waits for its timer: attempt n+1 starts at the time the timer was set for
    starts = {c.attempt: seq for seq, _, c in d.invokes}
    fired = [a for a in d.log if isinstance(a.event, TimerFired)]
    assert [a.seq for a in fired] == [starts[n] for n in (2, 3, 4, 5)]
    assert [a.event.now for a in fired] == [cmd.at for _, _, cmd, _ in d.timers_set]
    assert d.root.state.status == "done"  # the fifth attempt succeeded
    check_run(d)


def test_no_retry_interval_retries_at_once_without_a_timer() -> None:
    d = Driver(chain("a", max_retries=1), {"a": ["fail"]}).run()
    assert d.timers_set == []
    assert [c.attempt for c in d.invokes_of()] == [1, 2]
    _first, second = (a for a in d.log if any(isinstance(c, Invoke) for c in a.commands))
    assert second.event.step == "a"  # the failure itself re-invoked it
    check_run(d)


def test_a_retry_timer_that_fires_early_or_twice_is_ignored() -> None:
    wf = chain("a", max_retries=1, retry_interval=10.0)
    d = Driver(wf, {"a": ["fail"]}).start()
    deliver(d, "a")
    (timer,) = d.timers
    assert timer.event.now == 11.0
    early = TimerFired(now=10.5, kind="retry", step="a", attempt=1)
    d.apply(d.root_id, early, "stale")  # the driver checks: no change, no command
    fire(d, "retry")
    assert [c.attempt for c in d.invokes_of()] == [1, 2]
    d.apply(d.root_id, timer.event, "duplicate")
    d.drain()
    assert d.root.state.status == "done"


def test_compensation_retries_and_a_compensation_that_fails_for_good() -> None:
    wf = chain("a", "b", "c", max_retries=1)
    d = Driver(wf, {"c": ["perm"]}, {"c": ["fail", "ok"], "b": ["fail", "fail"]}).run()
    comp = [(c.step, c.attempt) for c in d.invokes_of(action="compensate")]
    assert comp == [("c", 1), ("c", 2), ("b", 1), ("b", 2), ("a", 1)]  # a still runs
    assert d.root.state.status == "failed"
    assert states(d) == {"a": "reverted", "b": "failed", "c": "reverted"}
    errors = [(e.step, e.action) for e in d.root.state.errors]
    assert errors == [("c", "invoke"), ("b", "compensate")]
    check_run(d)


def test_a_compensation_retry_waits_for_its_interval() -> None:
    wf = chain("a", max_retries=1, retry_interval=2.0)
    d = Driver(wf, {"a": ["perm"]}, {"a": ["fail"]}).run()
    (timer,) = [cmd for _, _, cmd, _ in d.timers_set]
    assert (timer.kind, timer.action, timer.attempt) == ("retry", "compensate", 1)
    assert [c.attempt for c in d.invokes_of(action="compensate")] == [1, 2]
    assert d.root.state.status == "reverted"


def test_a_pending_retry_is_dropped_once_compensation_begins() -> None:
    a, b, c = step("a"), step("b", max_retries=3, retry_interval=50.0), step("c")

    def composer(inp: Any) -> Any:
        return parallelize(a(inp), b(inp), c(inp))

    d = Driver(create_workflow("w", composer), {"b": ["fail"], "c": ["perm"]}).start()
    deliver(d, "b")  # b waits for its retry
    deliver(d, "c")  # c fails for good: compensation begins once a is back
    deliver(d, "a")
    fire(d, "retry")  # too late: b is never re-invoked
    d.drain()
    assert [c.attempt for c in d.invokes_of(action="invoke") if c.step == "b"] == [1]
    assert d.root.state.status == "reverted"
    assert sorted(s for a, s in d.trace() if a == "compensate") == ["a", "b", "c"]
    check_run(d)


# ------------------------------------------------------------------------- workflow timeout
def test_workflow_timeout_aborts_running_steps_and_compensates() -> None:
    a = step("a")
    b = step("b")
    c = step("c", max_retries=1, retry_interval=100.0)

    def composer(inp: Any) -> Any:
        x = a(inp)
        return parallelize(b(x), c(x))

    wf = create_workflow("slow", composer, timeout=10.0)
    d = Driver(wf, {"c": ["fail"]}).start()
    assert d.timers[0].event == TimerFired(now=10.0, kind="workflow_timeout")
    deliver(d, "a")
    deliver(d, "c")  # c waits for a retry at 103; b is still running
    # a timer that fires before the deadline does nothing
    d.apply(d.root_id, TimerFired(now=9.0, kind="workflow_timeout"), "stale")
    fire(d, "workflow_timeout")
    last = d.log[-1]
    assert last.before == "invoking"
    assert last.after == "waiting_to_compensate"
    assert [c for c in last.commands if isinstance(c, Abort)] == [
        Abort(step="b", action="invoke", attempt=1)
    ]
    assert not any(isinstance(c, Invoke) for c in last.commands)  # b is still in flight
    assert d.root.state.steps["c"].state == "timeout"
    d.drain()  # b reports its timeout; the retry timer of c fires and is ignored
    assert d.root.state.status == "reverted"
    assert [s for a, s in d.trace() if a == "invoke"] == ["a", "b", "c"]
    comps = [(seq, c.step) for seq, _, c in d.invokes if c.action == "compensate"]
    assert {s for _, s in comps[:2]} == {"b", "c"}
    assert comps[2][1] == "a"
    error = next(e for e in d.root.state.errors if e.step == "slow")
    assert error.type == "WorkflowTimeoutError"
    result = to_result(d.root.state, wf.graph)
    assert result.state is TransactionState.REVERTED
    assert "timeout" in d.events()
    check_run(d)


def test_workflow_timeout_after_the_end_is_ignored() -> None:
    wf = create_workflow("quick", lambda inp: step("a")(inp), timeout=10.0)
    d = Driver(wf).run()
    assert d.root.state.status == "done"
    assert d.root.finished == ["done"]
    assert not any(e.type == "WorkflowTimeoutError" for e in d.root.state.errors)


# ----------------------------------------------------------------------------------- cancel
def test_cancel_of_a_done_transaction_compensates_every_done_step() -> None:
    a, b, c, e = step("a"), step("b"), step("c"), step("e", compensate=False)

    def composer(inp: Any) -> Any:
        x = a(inp)
        y = when(inp, lambda _: False).then(lambda: b(x))
        return e(c(y))

    d = Driver(create_workflow("w", composer)).run()
    assert d.root.state.status == "done"
    d.apply(d.root_id, Cancel(now=100.0))
    d.drain()
    assert [s for a, s in d.trace() if a == "compensate"] == ["c", "a"]
    assert d.root.state.status == "reverted"
    assert d.root.finished == ["done", "reverted"]
    assert d.root.state.cancelled
    assert states(d) == {"a": "reverted", "b": "skipped", "c": "reverted", "e": "reverted"}
    # cancelling again does nothing
    d.apply(d.root_id, Cancel(now=200.0), "duplicate")
    check_run(d)


def test_cancel_of_a_running_transaction_waits_for_steps_in_flight() -> None:
    d = Driver(chain("a", "b", "c")).start()
    deliver(d, "a")
    d.apply(d.root_id, Cancel(now=5.0))
    assert d.root.state.status == "waiting_to_compensate"
    d.drain()  # b completes, is not followed by c, and is compensated
    assert d.trace() == [
        ("invoke", "a"),
        ("invoke", "b"),
        ("compensate", "b"),
        ("compensate", "a"),
    ]
    assert d.root.state.status == "reverted"
    assert d.root.finished == ["reverted"]
    check_run(d)


def test_cancel_of_a_not_started_transaction() -> None:
    wf = chain("a")
    g = wf.graph
    state = new_state(g, "t")
    state, commands = apply(g, state, Cancel(now=1.0))
    assert state.status == "reverted"
    assert state.cancelled
    assert Finished(state="reverted") in commands
    assert not any(isinstance(c, Invoke) for c in commands)
    # a Begin after that is ignored: the transaction is over
    again, commands = apply(g, state, Begin(now=2.0))
    assert commands == []
    assert again.status == "reverted"
    assert again.version == state.version


def test_cancel_while_compensating_or_after_reverted_is_ignored() -> None:
    d = Driver(chain("a", "b"), {"b": ["perm"]}).start()
    deliver(d, "a")
    deliver(d, "b")
    assert d.root.state.status == "compensating"
    d.apply(d.root_id, Cancel(now=5.0), "duplicate")
    d.drain()
    d.apply(d.root_id, Cancel(now=50.0), "duplicate")
    assert d.root.finished == ["reverted"]


# ------------------------------------------------------------------------------ async steps
def _async_wf(**config: Any) -> Any:
    a = step("a")
    b = step("b", async_=True, **config)
    c = step("c")
    return create_workflow("long", lambda inp: c(b(a(inp))))


def test_async_step_waits_for_complete_then_continues() -> None:
    wf = _async_wf()
    g = wf.graph
    assert g.has_async
    assert g.async_nodes == {"b"}
    d = Driver(wf, awaiting={"b"}).start()
    assert not is_settled(g, d.root.state)  # a is running
    deliver(d, "a")
    (invoke,) = [c for c in d.invokes_of() if c.step == "b"]
    assert invoke.async_
    assert is_settled(g, d.root.state)  # only an async step is left
    deliver(d, "b")  # the handler returned nothing: b awaits
    assert d.root.state.steps["b"].awaiting
    assert is_settled(g, d.root.state)
    assert d.root.state.status == "invoking"
    assert "step_awaiting" in d.events()
    d.apply(d.root_id, Complete(now=20.0, step="b", ok=True, output=encode({"paid": True})))
    assert not is_settled(g, d.root.state)
    d.drain()
    assert d.root.state.status == "done"
    assert decode(d.invokes_of()[-1].input) == {"paid": True}
    check_run(d)


def test_complete_while_the_async_handler_still_runs_is_accepted() -> None:
    d = Driver(_async_wf(), awaiting={"b"}).start()
    deliver(d, "a")
    d.apply(d.root_id, Complete(now=3.0, step="b", ok=True, output=encode(7)))
    assert d.root.state.steps["b"].state == "done"
    d.drain()  # b's late "awaiting" answer is stale and ignored
    assert d.root.state.status == "done"
    assert [a.changed for a in d.log if isinstance(a.event, StepDone) and a.event.awaiting] == [
        False
    ]


def test_complete_failure_of_an_async_step_is_retried_unless_forced_permanent() -> None:
    d = Driver(_async_wf(max_retries=1), awaiting={"b"}).start()
    deliver(d, "a")
    deliver(d, "b")
    error = StepError(step="b", action="invoke", type="Declined", message="card declined")
    d.apply(d.root_id, Complete(now=5.0, step="b", ok=False, error=error))
    assert [c.attempt for c in d.invokes_of() if c.step == "b"] == [1, 2]
    deliver(d, "b")
    d.apply(d.root_id, Complete(now=6.0, step="b", ok=False, error=error, force_permanent=False))
    d.drain()
    assert d.root.state.status == "reverted"
    assert d.root.state.errors[-1].message == "card declined"

    d = Driver(_async_wf(max_retries=3), awaiting={"b"}).start()
    deliver(d, "a")
    deliver(d, "b")
    d.apply(d.root_id, Complete(now=5.0, step="b", ok=False, force_permanent=True))
    d.drain()
    assert [c.attempt for c in d.invokes_of(action="invoke") if c.step == "b"] == [1]
    assert d.root.state.status == "reverted"
    assert d.root.state.errors[-1].type == "StepFailure"


def test_complete_for_a_step_that_is_not_awaiting_is_rejected() -> None:
    d = Driver(_async_wf(), awaiting={"b"}).start()
    before = d.root.state
    for event in (
        Complete(now=1.0, step="a", ok=True),  # a sync step, running
        Complete(now=1.0, step="b", ok=True),  # not started yet
        Complete(now=1.0, step="nope", ok=True),  # no such step
        Complete(now=1.0, step="b", action="compensate", ok=True),
    ):
        applied = d.apply(d.root_id, event)
        assert [type(c) for c in applied.commands] == [Reject], event
        assert not applied.changed
    assert d.root.state == before
    d.drain()
    assert d.root.state.status == "invoking"  # b awaits
    d.apply(d.root_id, Complete(now=9.0, step="b", ok=True))
    d.drain()
    applied = d.apply(d.root_id, Complete(now=10.0, step="b", ok=True))
    assert [type(c) for c in applied.commands] == [Reject]
    assert "not awaiting" in applied.commands[0].message


def test_retry_step_re_invokes_an_awaiting_step() -> None:
    d = Driver(_async_wf(), awaiting={"b"}).start()
    applied = d.apply(d.root_id, RetryStep(now=0.5, step="b"))  # not awaiting yet
    assert [type(c) for c in applied.commands] == [Reject]
    deliver(d, "a")
    deliver(d, "b")
    applied = d.apply(d.root_id, RetryStep(now=5.0, step="b"))
    (invoke,) = [c for c in applied.commands if isinstance(c, Invoke)]
    assert (invoke.step, invoke.attempt, invoke.async_) == ("b", 2, True)
    assert d.root.state.steps["b"].running
    # the answer for the first attempt is stale now
    d.apply(d.root_id, StepDone(now=6.0, step="b", attempt=1, output=encode(1)), "stale")
    d.apply(d.root_id, Complete(now=7.0, step="b", ok=True, output=encode(2)))
    d.drain()
    assert d.root.state.status == "done"


def test_async_step_timeout_fails_the_awaiting_step() -> None:
    d = Driver(_async_wf(timeout=30.0), awaiting={"b"}).start()
    deliver(d, "a")
    (timer,) = [cmd for _, _, cmd, _ in d.timers_set]
    assert (timer.kind, timer.step, timer.attempt, timer.at) == ("step_timeout", "b", 1, 31.0)
    deliver(d, "b")
    fire(d, "step_timeout")
    d.drain()
    assert d.root.state.steps["b"].state == "timeout"
    assert d.root.state.status == "reverted"
    assert d.root.state.errors[0].type == "StepTimeoutError"
    assert [s for a, s in d.trace() if a == "compensate"] == ["b", "a"]


def test_cancel_fails_an_awaiting_step_and_compensates_it() -> None:
    d = Driver(_async_wf(), awaiting={"b"}).start()
    deliver(d, "a")
    deliver(d, "b")
    d.apply(d.root_id, Cancel(now=8.0))
    d.drain()
    assert d.root.state.status == "reverted"
    assert [s for a, s in d.trace() if a == "compensate"] == ["b", "a"]
    d.apply(d.root_id, Complete(now=9.0, step="b", ok=True))  # too late
    assert isinstance(d.log[-1].commands[0], Reject)


def test_compensate_async_waits_for_complete() -> None:
    a = step("a", compensate_async=True)
    b = step("b")
    wf = create_workflow("w", lambda inp: b(a(inp)))
    d = Driver(wf, {"b": ["perm"]}).start()
    deliver(d, "a")
    deliver(d, "b")
    deliver(d, "b", "compensate")
    (comp,) = [c for c in d.invokes_of(action="compensate") if c.step == "a"]
    assert comp.async_
    # the compensation handler returns nothing: it waits for set_step_success
    d.apply(d.root_id, StepDone(now=9.0, step="a", action="compensate", attempt=1, awaiting=True))
    d.pending.clear()
    assert is_settled(wf.graph, d.root.state)
    d.apply(d.root_id, Complete(now=10.0, step="a", action="compensate", ok=True))
    assert d.root.state.status == "reverted"


# ------------------------------------------------------------------------ continue and skip
def test_continue_on_permanent_failure_records_the_error_and_goes_on() -> None:
    a, b, c = step("a"), step("b", continue_on_permanent_failure=True, max_retries=1), step("c")
    wf = create_workflow("w", lambda inp: c(b(a(inp))))
    d = Driver(wf, {"b": ["fail", "fail"]}).run()
    assert d.root.state.status == "done"
    assert states(d) == {"a": "done", "b": "failed", "c": "done"}
    assert decode(d.invokes_of()[-1].input) is None  # c sees None for b
    (error,) = d.root.state.errors
    assert (error.step, error.attempt) == ("b", 2)
    assert d.trace()[-1] == ("invoke", "c")
    check_run(d)


def test_a_continue_flagged_failure_is_compensated_if_the_run_reverts_later() -> None:
    a, b, c = step("a"), step("b", continue_on_permanent_failure=True), step("c")
    wf = create_workflow("w", lambda inp: c(b(a(inp))))
    d = Driver(wf, {"b": ["perm"], "c": ["perm"]}).run()
    assert d.root.state.status == "reverted"
    assert [s for a, s in d.trace() if a == "compensate"] == ["c", "b", "a"]
    check_run(d)


def test_skip_on_permanent_failure_skips_every_later_step() -> None:
    steps = [step("a"), step("b", skip_on_permanent_failure=True), step("c"), step("e")]
    wf = create_workflow("w", lambda inp: steps[3](steps[2](steps[1](steps[0](inp)))))
    d = Driver(wf, {"b": ["perm"]}).run()
    assert d.root.state.status == "done"
    assert states(d) == {"a": "done", "b": "failed", "c": "skipped_failure", "e": "skipped_failure"}
    assert d.trace() == [("invoke", "a"), ("invoke", "b")]
    assert [e.step for e in d.root.state.errors] == ["b"]
    check_run(d)


def test_skip_on_permanent_failure_up_to_a_named_step() -> None:
    a, b, c, e, f = (
        step("a"),
        step("b", skip_on_permanent_failure="e"),
        step("c"),
        step("e"),
        step("f"),
    )
    wf = create_workflow("w", lambda inp: f(e(c(b(a(inp))))))
    d = Driver(wf, {"b": ["perm"]}).run()
    assert d.root.state.status == "done"
    assert states(d) == {
        "a": "done",
        "b": "failed",
        "c": "skipped_failure",
        "e": "done",
        "f": "done",
    }
    assert decode(d.invokes_of()[2].input) is None  # e's input came from the skipped c
    check_run(d)


# ------------------------------------------------------------------------------ nested flows
def test_nested_workflow_runs_as_its_own_transaction_and_is_compensated_whole() -> None:
    x, y = step("x"), step("y")
    child = create_workflow("child", lambda inp: y(x(inp)))
    a, b = step("a"), step("b")
    parent = create_workflow("parent", lambda inp: b(child.run_as_step(a(inp))))
    d = Driver(parent, {"b": ["perm"]}).run({"n": 1})
    (kid_id,) = d.child_ids("child-as-step")
    assert set(d.txs) == {"tx", kid_id}
    kid = d.txs[kid_id]
    assert kid.state.parent is not None
    assert kid.state.parent.step == "child-as-step"
    assert kid.finished == ["done", "reverted"]
    assert d.trace(kid_id) == [
        ("invoke", "x"),
        ("invoke", "y"),
        ("compensate", "y"),
        ("compensate", "x"),
    ]
    assert decode(d.invokes_of()[1].input) == {"step": "y", "attempt": 1}  # the child's result
    assert d.root.state.status == "reverted"
    assert states(d) == {"a": "reverted", "child-as-step": "reverted", "b": "reverted"}
    check_run(d)


def test_a_nested_workflow_that_reverts_fails_the_parent_step() -> None:
    x, y = step("x"), step("y")
    child = create_workflow("child", lambda inp: y(x(inp)))
    a = step("a")
    parent = create_workflow("parent", lambda inp: child.run_as_step(a(inp)))
    d = Driver(parent, {"y": ["perm"]}).run()
    (kid_id,) = d.child_ids("child-as-step")
    assert d.txs[kid_id].finished == ["reverted"]
    assert d.root.state.status == "reverted"
    # the child undid itself: the parent does not cancel it again
    assert not any(c.step == "child-as-step" for _, _, c in d.children[1:])
    error = next(e for e in d.root.state.errors if e.step == "child-as-step")
    assert error.action == "invoke"
    check_run(d)


def test_a_nested_workflow_whose_compensation_fails_makes_the_parent_fail() -> None:
    x = step("x")
    child = create_workflow("child", lambda inp: x(inp))
    b = step("b")
    parent = create_workflow("parent", lambda inp: b(child.run_as_step(inp)))
    d = Driver(parent, {"b": ["perm"]}, {"x": ["perm"]}).run()
    (kid_id,) = d.child_ids("child-as-step")
    assert d.txs[kid_id].finished == ["done", "failed"]
    assert d.root.state.status == "failed"
    assert to_result(d.root.state).step_table["child-as-step"].state is StepState.FAILED
    check_run(d)


def test_workflow_timeout_aborts_a_running_child_which_undoes_itself() -> None:
    x, y = step("x"), step("y")
    child = create_workflow("child", lambda inp: y(x(inp)))
    a = step("a")
    parent = create_workflow("parent", lambda inp: child.run_as_step(a(inp)), timeout=10.0)
    d = Driver(parent).start()
    deliver(d, "a")
    deliver(d, "x")  # the child runs y now
    fire(d, "workflow_timeout")
    (kid_id,) = d.child_ids("child-as-step")
    aborts = [c for _, t, c in d.children if t == d.root_id and isinstance(c, CancelChild)]
    assert [(c.transaction_id, c.abort) for c in aborts] == [(kid_id, True)]
    assert [c for _, t, c in d.aborts if t == kid_id] == [
        Abort(step="y", action="invoke", attempt=1)
    ]
    d.drain()
    assert d.txs[kid_id].finished == ["reverted"]
    assert d.trace(kid_id)[2:] == [("compensate", "y"), ("compensate", "x")]
    assert d.root.state.status == "reverted"
    assert d.trace() == [("invoke", "a"), ("compensate", "a")]  # the child undid itself
    assert states(d)["child-as-step"] == "reverted"
    check_run(d)


def test_a_cancel_with_abort_aborts_the_handlers_in_flight() -> None:
    d = Driver(chain("a", "b")).start()
    applied = d.apply(d.root_id, Cancel(now=0.5, abort=True))
    assert [c for c in applied.commands if isinstance(c, Abort)] == [
        Abort(step="a", action="invoke", attempt=1)
    ]
    d.drain()
    assert d.trace() == [("invoke", "a"), ("compensate", "a")]
    assert d.root.state.steps["a"].state == "timeout"
    assert d.root.state.status == "reverted"
    check_run(d)


# ------------------------------------------------------------------ purity and duplicates
def test_results_for_unknown_steps_and_attempts_are_ignored() -> None:
    d = Driver(chain("a", "b")).start()
    error = StepError(step="a", action="invoke", type="E", message="m")
    for event in (
        StepDone(now=1.0, step="zzz", attempt=1),
        StepDone(now=1.0, step="a", attempt=2),
        StepDone(now=1.0, step="a", attempt=0),
        StepDone(now=1.0, step="b", attempt=1),  # not started
        StepFailed(now=1.0, step="a", action="compensate", attempt=1, error=error),
        TimerFired(now=1.0, kind="retry", step="zzz"),
        TimerFired(now=1.0, kind="step_timeout", step="a", attempt=2),
        TimerFired(now=1.0, kind="retry", step="a", attempt=1),  # no retry is due
        Begin(now=1.0),
    ):
        d.apply(d.root_id, event, "stale")
    d.drain()
    assert d.root.state.status == "done"


def test_old_states_can_be_replayed() -> None:
    wf = chain("a", "b", max_retries=1)
    g = wf.graph
    s0 = new_state(g, "t")
    s1, _ = apply(g, s0, Begin(now=0.0, input=encode(1)))
    s2, c2 = apply(g, s1, StepFailed(now=1.0, step="a", attempt=1, error=_err("a")))
    s2b, c2b = apply(g, s1, StepDone(now=1.0, step="a", attempt=1, output=encode(2)))
    assert s1.steps["a"].state == "invoking"
    assert s1.version == 1
    assert [c.attempt for c in c2 if isinstance(c, Invoke)] == [2]
    assert [c.step for c in c2b if isinstance(c, Invoke)] == ["b"]
    assert s2.steps["a"].attempt == 2
    assert s2b.steps["a"].state == "done"
    assert s2.version == s2b.version == 2
    assert new_state(g, "t").steps["a"].state == "not_started"


def _err(name: str) -> StepError:
    return StepError(step=name, action="invoke", type="RuntimeError", message="boom")


@pytest.mark.parametrize("kind", ["retry", "workflow_timeout", "step_timeout"])
def test_timers_for_a_finished_transaction_do_nothing(kind: str) -> None:
    d = Driver(chain("a")).run()
    d.apply(d.root_id, TimerFired(now=1e9, kind=kind, step="a", attempt=1), "stale")


def test_set_timer_is_the_only_command_a_delayed_retry_needs() -> None:
    wf = chain("a", max_retries=1, retry_interval=1.5)
    g = wf.graph
    s1, _ = apply(g, new_state(g, "t"), Begin(now=0.0))
    _, commands = apply(g, s1, StepFailed(now=2.0, step="a", attempt=1, error=_err("a")))
    assert [c for c in commands if not _is_emit(c)] == [
        SetTimer(at=3.5, kind="retry", step="a", action="invoke", attempt=1)
    ]


def _is_emit(command: Any) -> bool:
    return type(command).__name__ == "Emit"


def test_the_failed_step_gets_none_even_when_an_earlier_attempt_had_output() -> None:
    # a non-custom failed step: its compensation input is None (NONE bytes on the wire)
    d = Driver(chain("a", max_retries=1), {"a": ["fail", "perm"]}).run()
    (comp,) = d.invokes_of(action="compensate")
    assert comp.input == NONE
