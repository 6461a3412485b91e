"""The saga rules of DESIGN.md section 3, checked against what a :class:`Driver` run did.

The expectations are derived from what the driver delivered (the outcome of each attempt), not
from the machine's own bookkeeping; the machine's records are then compared with them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from orchestrator._codec import decode
from orchestrator._transaction import (
    Cancel,
    CancelChild,
    Invoke,
    StartChild,
    TimerFired,
    to_result,
)

from .driver import FINAL, Driver, Tx, comp_input_of, output_of, perm_input_of

__all__ = ["Verdict", "check_run", "check_tx"]

TEMPORARY = ("fail", "timeout", "await")
"""Outcomes after which an attempt may follow (``await``: ``RetryStep`` or a failed Complete)."""


@dataclasses.dataclass
class Verdict:
    """What the oracle concluded about one transaction (for tests that want more checks)."""

    fates: dict[str, str]
    compensated: set[str]
    compensating: bool
    comp_failed: set[str]


def check_run(d: Driver) -> dict[str, Verdict]:
    """Check every transaction of the run; the verdicts by transaction id."""
    assert not d.pending, "the run is not over"
    assert not d.timers, "the run is not over"
    return {tx.id: check_tx(d, tx) for tx in d.txs.values()}


def check_tx(d: Driver, tx: Tx) -> Verdict:
    g = tx.graph
    st = tx.state
    log = [a for a in d.log if a.tx == tx.id]

    # 5. every transaction ends, and Finished comes once (once more for each cancel of `done`)
    assert st.status in FINAL, f"{tx.id} ended {st.status}"
    assert len(tx.finished) == 1 + tx.cancels_of_done, (tx.id, tx.finished)
    assert tx.finished[-1] == st.status
    assert d.events(tx.id).count("finish") == len(tx.finished)
    assert d.events(tx.id).count("begin") == 1

    forward: dict[str, list[Any]] = collections.defaultdict(list)
    backward: dict[str, list[tuple[int, Any]]] = collections.defaultdict(list)
    for seq, t, c in d.invokes:
        if t == tx.id:
            (forward if c.action == "invoke" else backward)[c.step].append((seq, c))
    aborted_children: list[tuple[int, CancelChild]] = []
    for seq, t, c in d.children:
        if t != tx.id:
            continue
        if isinstance(c, CancelChild) and c.abort:
            aborted_children.append((seq, c))  # not a compensation: the child undoes itself
        else:
            (forward if isinstance(c, StartChild) else backward)[c.step].append((seq, c))

    # 3. no forward command once the transaction left `invoking` or began compensating
    first_comp = min((s for v in backward.values() for s, _ in v), default=None)
    for a in log:
        fwd = [
            c
            for c in a.commands
            if (isinstance(c, Invoke) and c.action == "invoke") or isinstance(c, StartChild)
        ]
        if fwd:
            assert a.before in ("invoking", "not_started"), (a.before, fwd)
            assert first_comp is None or a.seq < first_comp, ("forward after compensation", fwd)

    timeout_hit = False
    for a in log:
        if isinstance(a.event, TimerFired) and a.event.kind == "workflow_timeout":
            if a.kind == "normal":
                assert a.changed == (a.before == "invoking"), a
            timeout_hit |= a.changed
    cancelled = tx.cancels_accepted > 0
    for seq, c in aborted_children:  # only a timeout or an aborting cancel aborts a child
        (a,) = [a for a in log if a.seq == seq]
        assert isinstance(a.event, TimerFired | Cancel), (a.event, c)
        assert a.before == "invoking", (a, c)

    # 7. attempts 1, 2, 3...; only temporary failures are retried, at most max_retries times
    fates: dict[str, str] = {}
    cut_short: set[str] = set()
    final_failure: set[str] = set()
    last_outcome: dict[str, str] = {}
    for node in g.nodes:
        name, cfg = node.name, node.config
        cmds = [c for _, c in forward[name]]
        attempts = [c.attempt for c in cmds]
        assert attempts == list(range(1, len(attempts) + 1)), (name, attempts)
        assert len(attempts) <= cfg.max_retries + 1, (name, attempts, cfg.max_retries)
        record = st.steps[name]
        if not attempts:
            fates[name] = "none"
            assert record.state in ("not_started", "skipped", "skipped_failure"), (name, record)
            continue
        assert record.attempt == len(attempts)
        outcomes = []
        for c in cmds:
            # (for a nested workflow: the state its accepted ChildFinished reported; a child
            # that was aborted right after it finished `done` may report either)
            outcome = d.results.get((tx.id, name, "invoke", c.attempt), (0, "?"))[1]
            if node.kind == "subflow":
                assert outcome in d.txs[c.transaction_id].finished, (name, outcome)
            outcomes.append(outcome)
            assert outcome != "?", f"{tx.id}: attempt {c.attempt} of {name} was never answered"
        retried = outcomes[:-1]
        # a child that ended `failed` left effects behind: it is never run again
        temporary = ("reverted",) if node.kind == "subflow" else TEMPORARY
        assert all(o in temporary for o in retried), (name, outcomes)
        last = outcomes[-1]
        last_outcome[name] = last
        if last in ("ok", "done"):
            fates[name] = "done"
            assert record.state == "done", (name, record)
        elif last == "skip":
            fates[name] = "skipped"
            assert record.state == "skipped", (name, record)
        else:
            fates[name] = "failed"
            if last == "await" or (last in temporary and len(outcomes) < cfg.max_retries + 1):
                # its retry never came: compensation began first (or the workflow timed out)
                cut_short.add(name)
                assert record.state in ("failed", "timeout"), (name, last, record)
            else:
                final_failure.add(name)
                timed_out = last in ("timeout", "abort")
                want = "timeout" if timed_out else "failed"
                assert record.state == want, (name, last, record)

    stops = {
        n.name
        for n in g.nodes
        if fates[n.name] == "failed"
        and not (n.config.continue_on_permanent_failure or n.config.skip_on_permanent_failure)
    }
    compensating = bool(stops) or timeout_hit or cancelled
    assert compensating == (st.status != "done"), (tx.id, st.status, stops, timeout_hit)
    if cut_short:
        assert compensating, f"{tx.id}: retries of {cut_short} never came, yet it ended done"

    # skip_on_permanent_failure: the steps after a failed one are skipped (up to the named one)
    for node in g.nodes:
        skip = node.config.skip_on_permanent_failure
        if fates[node.name] != "failed" or not skip or node.config.continue_on_permanent_failure:
            continue
        spared: frozenset[str] = frozenset()
        if isinstance(skip, str) and skip in g.index:
            spared = {skip} | g.successors[skip]
        for name in g.successors[node.name] - spared:
            assert fates[name] == "none", (node.name, name, fates[name])
            # (a failure that came after compensation began skips nothing: nothing runs then)
            allowed = ("skipped_failure", "not_started") if compensating else ("skipped_failure",)
            assert st.steps[name].state in allowed, (name, st.steps[name])

    # 1. exactly the steps that took effect or failed for good are compensated, with the input
    #    their StepResponse / permanent failure gave (None for a failed step)
    expected: set[str] = set()
    if compensating:
        for node in g.nodes:
            fate = fates[node.name]
            if node.kind == "subflow":
                if fate == "done":
                    expected.add(node.name)
            elif fate in ("done", "failed") and not node.config.no_compensation:
                expected.add(node.name)
    compensated = set(backward)
    assert compensated == expected, (tx.id, sorted(compensated), sorted(expected), fates)

    comp_failed: set[str] = set()
    comp_finished_at: dict[str, int] = {}
    for name in (n.name for n in g.nodes if n.name in compensated):
        node = g.index[name]
        cmds = [c for _, c in backward[name]]
        attempts = [c.attempt for c in cmds]
        assert attempts == list(range(1, len(attempts) + 1)), (name, attempts)
        record = st.steps[name]
        assert record.comp_attempt == len(attempts)
        if node.kind == "subflow":
            assert len(cmds) == 1, "a nested workflow is cancelled once"
            assert isinstance(cmds[0], CancelChild)
            child = d.txs[cmds[0].transaction_id]
            assert len(child.finished) >= 2, f"child {child.id} was not compensated"
            outcome = "ok" if child.finished[-1] == "reverted" else "perm"
            seq, delivered = d.results[(tx.id, name, "compensate", 1)]
            assert delivered == child.finished[-1]
            outcomes, seqs = [outcome], [seq]
        else:
            want = _expected_comp_input(d, name, fates[name], last_outcome[name], record.attempt)
            for c in cmds:
                assert decode(c.input) == want, (name, decode(c.input), want)
            answers = [d.results[(tx.id, name, "compensate", a)] for a in attempts]
            seqs = [s for s, _ in answers]
            outcomes = [o for _, o in answers]
        # compensations retry like invokes, and their retries are never cut short
        assert all(o == "fail" for o in outcomes[:-1]), (name, outcomes)
        assert len(outcomes) <= node.config.max_retries + 1
        if outcomes[-1] == "ok":
            assert record.comp == "reverted", (name, record)
        else:
            if outcomes[-1] == "fail":
                assert len(outcomes) == node.config.max_retries + 1, (name, outcomes)
            assert record.comp == "failed", (name, record)
            comp_failed.add(name)
        comp_finished_at[name] = seqs[-1]

    # 2. reverse dependency order: X's compensation starts only after every compensated step
    #    that ran after X finished compensating
    for name in (n.name for n in g.nodes if n.name in compensated):
        started = backward[name][0][0]
        for later in sorted(g.successors[name] & compensated):
            assert comp_finished_at[later] <= started, (
                f"{tx.id}: {name} compensated (at {started}) before {later} finished "
                f"compensating (at {comp_finished_at[later]})"
            )

    # 4. the final state
    child_failed = {
        n.name
        for n in g.nodes
        if n.kind == "subflow" and fates[n.name] == "failed" and last_outcome[n.name] == "failed"
    }
    if compensating:
        for name in child_failed:
            assert st.steps[name].comp == "failed", (name, st.steps[name])
        want_state = "failed" if comp_failed or child_failed else "reverted"
        assert st.status == want_state, (tx.id, st.status, comp_failed, child_failed)
        for n in g.nodes:
            if fates[n.name] in ("done", "failed") and n.name not in comp_failed | child_failed:
                assert st.steps[n.name].comp == "reverted", (n.name, st.steps[n.name])
    else:
        assert st.result is not None

    # errors: one per failure for good (a step whose retry was cut short may have none)
    errors = collections.Counter((e.step, e.action) for e in st.errors)
    comp_errors = {s for (s, a) in errors if a == "compensate"}
    assert comp_errors == comp_failed, (tx.id, comp_errors, comp_failed)
    invoke_errors = {s for (s, a) in errors if a == "invoke" and s in g.index}
    assert final_failure <= invoke_errors <= final_failure | cut_short, (
        tx.id,
        invoke_errors,
        final_failure,
        cut_short,
    )
    assert all(v == 1 for v in errors.values()), errors
    timeout_errors = [e for e in st.errors if e.step == g.name]
    assert len(timeout_errors) == int(timeout_hit)

    # the public view agrees
    result = to_result(st, g)
    assert result.state.value == st.status
    assert [s.name for s in result.steps] == [n.name for n in g.nodes]
    return Verdict(fates, compensated, compensating, comp_failed)


def _expected_comp_input(d: Driver, name: str, fate: str, last: str, attempt: int) -> Any:
    custom = name in d.custom_comp
    if fate == "done":
        return comp_input_of(name) if custom else output_of(name, attempt)
    if custom and last == "perm":
        return perm_input_of(name)
    return None
