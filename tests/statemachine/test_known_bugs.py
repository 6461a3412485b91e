"""Regression tests for bugs that the state-machine tests found.

They were written as ``xfail(strict=True)`` minimal failing tests; each bug was then fixed in
``_transaction.py`` / ``_composer.py`` (the fix named in each docstring), so they are plain tests
now. Each docstring says what went wrong.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator._codec import encode
from orchestrator._composer import create_workflow, parallelize, when
from orchestrator._step import create_step
from orchestrator._transaction import Begin, StepDone, apply, new_state

from .driver import Driver
from .oracle import check_run


def step(name: str, **config: Any) -> Any:
    return create_step(name, _noop, _noop, **config)


def _noop(data: Any, ctx: Any) -> Any:
    return data


def test_nested_child_ids_are_unique() -> None:
    """Nested transaction ids were ambiguous (``_Machine.start``).

    ``"<wf>-as-step-<tx>"`` plus ``"-attempt-<n>"`` only from attempt 2 on: attempt 2 of a
    grandchild under attempt 1 of a child, and attempt 1 of the grandchild under attempt 2 of
    the child, both got ``inner-as-step-middle-as-step-tx-attempt-2`` (an engine that attaches
    to an existing id would return the wrong run). Fix: ids that name the whole path.
    """
    i1 = step("i1")
    inner = create_workflow("inner", lambda inp: i1(inp))
    middle = create_workflow("middle", lambda inp: inner.run_as_step(inp).config(max_retries=1))
    root = create_workflow("root", lambda inp: middle.run_as_step(inp).config(max_retries=1))
    # i1 fails in the first two inner transactions: middle#1 retries inner and gives up, so
    # root retries middle, whose first inner transaction then reuses an id
    d = Driver(root, {"i1": ["perm", "perm"]})
    d.run()  # the driver asserts that no StartChild reuses a transaction id
    started = [c.transaction_id for _, _, c in d.children]
    assert len(started) == len(set(started))
    check_run(d)


def test_a_chain_inside_a_when_branch_of_parallelize_stays_a_chain() -> None:
    """``parallelize`` split a ``when`` block whose body is a chain (``_composer.py``).

    ``_When.then`` returns every unit the block created and each unit became a branch mark, so
    ``c`` ran concurrently with ``b`` instead of after it (and got ``None`` for ``b``'s output).
    Fix: one branch per argument, ending at its last unit.
    """
    a, b, c = step("a"), step("b"), step("c")

    def composer(inp: Any) -> Any:
        return parallelize(a(inp), when(inp, lambda _: True).then(lambda: c(b(inp))))

    graph = create_workflow("w", composer).graph
    after = {n.name: n.after for n in graph.nodes}
    assert after["c"] == ("b",)


def test_a_duplicate_awaiting_answer_is_ignored() -> None:
    """A duplicate ``StepDone(awaiting=True)`` was applied again (``_Machine.on_result``).

    The version was bumped and a second ``step_awaiting`` event emitted, where every other
    duplicate is ignored. Fix: ignore it when the step already awaits.
    """
    a = step("a", async_=True)
    wf = create_workflow("w", lambda inp: a(inp))
    g = wf.graph
    s1, _ = apply(g, new_state(g, "t"), Begin(now=0.0, input=encode(1)))
    awaiting = StepDone(now=1.0, step="a", attempt=1, awaiting=True)
    s2, _ = apply(g, s1, awaiting)
    assert s2.steps["a"].awaiting
    s3, commands = apply(g, s2, awaiting)
    assert commands == []
    assert s3.version == s2.version


@pytest.mark.parametrize(
    "flag", [{"continue_on_permanent_failure": True}, {"skip_on_permanent_failure": True}]
)
def test_a_raising_predicate_leaves_a_continue_flagged_step_failed(flag: dict[str, Any]) -> None:
    """A raising ``when`` predicate left a continue/skip-flagged step ``skipped``.

    ``fail_for_good`` marked the block's first step failed and recorded the error, then
    ``decide_blocks`` returned False and ``dispatch_ready`` overwrote the state with ``skipped``
    (and emitted ``step_skipped`` after ``step_failure``). DESIGN: "the step stays failed".
    """
    a, b, c = step("a"), step("b", **flag), step("c")

    def boom(_: Any) -> bool:
        raise ValueError("bad predicate")

    def composer(inp: Any) -> Any:
        x = a(inp)
        return c(when(inp, boom).then(lambda: b(x)))

    d = Driver(create_workflow("w", composer)).run()
    assert [e.step for e in d.root.state.errors] == ["b"]
    assert d.root.state.steps["b"].state == "failed"


def test_a_child_that_ended_failed_is_not_retried_and_the_parent_fails() -> None:
    """A nested transaction that ended ``failed`` was retried (``_Machine.on_child``).

    Its compensation failed, so effects were left behind, yet it failed the parent step like a
    temporary error: with ``max_retries`` the parent ran the child again and could end ``done``
    or ``reverted``. Fix: a child that ended ``failed`` fails the step for good.
    """
    c1, c2 = step("c1"), step("c2")
    child = create_workflow("child", lambda inp: c2(c1(inp)))
    parent = create_workflow("parent", lambda inp: child.run_as_step(inp).config(max_retries=1))
    # child#1: c2 fails, compensating c1 fails -> child#1 ends failed; child#2 would succeed
    d = Driver(parent, {"c2": ["perm"]}, {"c1": ["perm"]}).run()
    first, *again = d.child_ids("child-as-step")
    assert d.txs[first].state.status == "failed"
    assert again == []  # not run a second time
    assert d.root.state.status == "failed"
