"""A deterministic, synchronous driver for the pure transaction state machine.

No actors, no async: the driver plays the coordinator shell and the step executors. It applies
``Begin`` to a workflow's state machine and carries out the commands:

* ``Invoke``: records the invocation and queues its result, decided by a *script* (per step and
  action, a list of outcomes indexed by how many times that step/action has been invoked so far,
  across every transaction of the run; past its end every attempt succeeds);
* ``StartChild``: runs the child workflow's own state machine in the same driver, and queues a
  ``ChildFinished`` for the parent when the child finishes;
* ``CancelChild``: applies ``Cancel(parent_attempt=n)`` to the child (which reported ``done``);
  its next ``Finished`` is reported to the parent as ``ChildFinished(action="compensate")``, or
  at once if the child is over already (as the coordinator does). ``CancelChild(abort=True)``
  (a parent that timed out) applies ``Cancel(abort=True)`` to a running child, whose
  ``Finished`` then answers the parent's invoke;
* ``SetTimer``: a virtual clock: the timer fires with ``now = max(clock, at)``;
* ``Abort``: the running handler's queued result becomes a timeout failure.

With an ``rng`` the driver delivers the outstanding results and timers in a random order, and now
and then re-delivers a duplicate of an earlier event or a stale result (an attempt already
answered); the machine must ignore those (checked on the spot). Without one, it is FIFO, and a
timer fires only when no result is outstanding (earliest first).

Every ``apply`` is checked for purity: the old state is unchanged, applying the same event twice
gives equal results, and the new state survives a msgpack round trip (it is what gets persisted).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from orchestrator import _transaction
from orchestrator._codec import encode
from orchestrator._composer import Workflow
from orchestrator._graph import Graph
from orchestrator._transaction import (
    Abort,
    Begin,
    Cancel,
    CancelChild,
    ChildFinished,
    Command,
    Complete,
    Emit,
    Event,
    Finished,
    Invoke,
    ParentLink,
    PublishHook,
    Reject,
    Resume,
    SetTimer,
    StartChild,
    StepDone,
    StepFailed,
    TimerFired,
    TxState,
    apply,
)
from orchestrator._types import StepError

__all__ = [
    "COMP_OUTCOMES",
    "INVOKE_OUTCOMES",
    "Applied",
    "Driver",
    "Tx",
    "all_workflows",
    "comp_input_of",
    "output_of",
    "perm_input_of",
]

INVOKE_OUTCOMES = ("ok", "fail", "perm", "timeout", "skip")
"""``perm``: a permanent failure; ``timeout``: a timeout failure (retried like ``fail``)."""
COMP_OUTCOMES = ("ok", "fail", "perm")
FINAL = frozenset(("done", "reverted", "failed"))
_DURATION = 1.0
"""How far the virtual clock moves with each delivered result."""


def output_of(step: str, attempt: int) -> Any:
    """The output the driver gives an ``ok`` invoke."""
    return {"step": step, "attempt": attempt}


def comp_input_of(step: str) -> Any:
    """The ``compensate_input`` of a step listed in ``custom_comp`` (a ``StepResponse``)."""
    return {"undo": step}


def perm_input_of(step: str) -> Any:
    """The ``compensate_input`` of a permanent failure of a step listed in ``custom_comp``."""
    return {"perm": step}


def all_workflows(wf: Workflow) -> dict[str, Workflow]:
    """``wf`` and every workflow nested in it, by name."""
    found = {wf.name: wf}
    for child in wf.children():
        found.update(all_workflows(child))
    return found


@dataclasses.dataclass
class Tx:
    """One transaction run by the driver (the root, or a nested one)."""

    id: str
    workflow: Workflow
    graph: Graph
    state: TxState
    parent: tuple[str, str, int] | None = None
    """(parent transaction, step, attempt) for a nested transaction."""
    cancel_attempt: int | None = None
    """Set by ``CancelChild``: the next ``Finished`` answers the parent's compensation."""
    finished: list[str] = dataclasses.field(default_factory=list)
    cancels_accepted: int = 0
    """``Cancel`` events applied while the transaction was ``invoking`` or ``done``."""
    cancels_of_done: int = 0
    """``Cancel`` events applied to a ``done`` transaction (each one finishes it again)."""


@dataclasses.dataclass
class Applied:
    """One ``apply`` call: what went in, the status around it, what came out."""

    seq: int
    tx: str
    event: Event
    before: str
    after: str
    commands: list[Command]
    kind: str
    """``normal``, ``duplicate`` (an earlier event again) or ``stale`` (an answered attempt)."""
    changed: bool


@dataclasses.dataclass
class _Pending:
    tx: str
    event: Event
    key: tuple[str, str, str, int] | None = None
    """(tx, step, action, attempt) of a step result."""
    outcome: str = ""


class Driver:
    """Runs a workflow (and its nested workflows) through the state machine."""

    def __init__(
        self,
        wf: Workflow,
        script: Mapping[str, Sequence[str]] | None = None,
        comp_script: Mapping[str, Sequence[str]] | None = None,
        *,
        rng: random.Random | None = None,
        custom_comp: frozenset[str] | set[str] = frozenset(),
        awaiting: frozenset[str] | set[str] = frozenset(),
        duplicates: float = 0.15,
        cancel_at: int | None = None,
        cancel_abort: bool = False,
        max_applies: int = 20_000,
    ) -> None:
        self.root_workflow = wf
        self.workflows = all_workflows(wf)
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.comp_script = {k: list(v) for k, v in (comp_script or {}).items()}
        self.rng = rng
        self.custom_comp = frozenset(custom_comp)
        self.awaiting = frozenset(awaiting)
        """Steps whose handler returns nothing (async): ``StepDone(awaiting=True)``."""
        self.duplicates = duplicates
        self.cancel_at = cancel_at
        """Cancel the root after this many deliveries (at the end, if it is over sooner)."""
        self.cancel_abort = cancel_abort
        """The cancel aborts the handlers in flight (``Cancel(abort=True)``)."""
        self.max_applies = max_applies
        self.clock = 0.0
        self.seq = 0
        self.txs: dict[str, Tx] = {}
        self.root_id = "tx"
        self.pending: list[_Pending] = []
        self.timers: list[_Pending] = []
        self.delivered: list[_Pending] = []
        self.log: list[Applied] = []
        self.calls: dict[tuple[str, str], int] = {}
        """How many times each (step, action) was invoked, across transactions."""
        self.invokes: list[tuple[int, str, Invoke]] = []
        """(seq, tx, command) of every ``Invoke``."""
        self.children: list[tuple[int, str, StartChild | CancelChild]] = []
        self.results: dict[tuple[str, str, str, int], tuple[int, str]] = {}
        """(tx, step, action, attempt) -> (seq, outcome) of each delivered (accepted) result."""
        self.timers_set: list[tuple[int, str, SetTimer, float]] = []
        """(seq, tx, command, now) of every ``SetTimer``."""
        self.aborts: list[tuple[int, str, Abort]] = []
        self.rejects: list[tuple[int, str, Reject]] = []
        self.hooks: list[tuple[str, PublishHook]] = []
        self.emitted: list[tuple[str, Emit]] = []

    # ---------------------------------------------------------------- applying events
    @property
    def root(self) -> Tx:
        return self.txs[self.root_id]

    def apply(self, tx_id: str, event: Event, kind: str = "normal") -> Applied:
        """Apply ``event`` to a transaction, check purity, carry out the commands."""
        tx = self.txs[tx_id]
        old = tx.state
        old_bytes = encode(old)
        new, commands = apply(tx.graph, old, event)
        assert encode(old) == old_bytes, f"apply modified the old state ({event})"
        again, commands2 = apply(tx.graph, old, event)
        assert encode(again) == encode(new), f"apply is not deterministic ({event})"
        assert commands2 == commands, f"apply is not deterministic ({event})"
        assert encode(old) == old_bytes, f"apply modified the old state ({event})"
        if kind != "normal":
            assert encode(new) == old_bytes, f"a {kind} event changed the state: {event}"
            assert commands == [], f"a {kind} event gave commands: {event} -> {commands}"
        # The state is what the coordinator persists: carry on from its round-tripped copy.
        persisted = msgspec.msgpack.decode(encode(new), type=TxState)
        assert encode(persisted) == encode(new)
        tx.state = persisted
        self.seq += 1
        changed = new.version != old.version
        applied = Applied(self.seq, tx_id, event, old.status, new.status, commands, kind, changed)
        self.log.append(applied)
        if isinstance(event, Cancel) and old.status in ("invoking", "done"):
            tx.cancels_accepted += 1
            tx.cancels_of_done += old.status == "done"
        if changed and kind == "normal":
            self._record_result(tx_id, old, event, applied.seq)
        for command in commands:
            self.command(tx, command, event.now, applied.seq)
        self._check_resume(tx)
        return applied

    def _check_resume(self, tx: Tx) -> None:
        """``Resume`` (a takeover) changes nothing and sends again exactly the commands of the
        attempts still in flight, as they were first sent."""
        state = tx.state
        # The real machine: mutation tests patch ``apply`` to break the run, not this check.
        again, commands = _transaction.apply(tx.graph, state, Resume(now=self.clock))
        assert encode(again) == encode(state), "Resume changed the state"
        sent: dict[tuple[str, str, int], Command] = {
            (c.step, c.action, c.attempt): c for _, t, c in self.invokes if t == tx.id
        }
        for _, t, c in self.children:
            if t == tx.id:
                action = "invoke" if isinstance(c, StartChild) else "compensate"
                sent[c.step, action, c.attempt] = c
        expected = {}
        if state.status not in FINAL and state.status != "not_started":
            for name, record in state.steps.items():
                if not record.running or record.retry_at is not None:
                    continue
                if record.state == "invoking":
                    expected[name, "invoke", record.attempt] = sent[name, "invoke", record.attempt]
                elif record.comp == "compensating":
                    key = (name, "compensate", record.comp_attempt)
                    expected[key] = sent[key]
        got = {
            (c.step, "invoke" if isinstance(c, Invoke | StartChild) else "compensate", c.attempt)
            if not isinstance(c, Invoke)
            else (c.step, c.action, c.attempt): c
            for c in commands
            if isinstance(c, Invoke | StartChild | CancelChild)
        }
        assert len(got) == len(commands), f"Resume gave other commands: {commands}"
        assert got == expected, f"Resume sent {got}, expected {expected}"

    def _record_result(self, tx_id: str, old: TxState, event: Event, seq: int) -> None:
        """Note the outcome of the attempt that an accepted event answered."""
        outcome = None
        if isinstance(event, StepDone):
            outcome = "skip" if event.skipped else "await" if event.awaiting else "ok"
        elif isinstance(event, StepFailed):
            outcome = "perm" if event.permanent else "timeout" if event.timeout else "fail"
        elif isinstance(event, ChildFinished):
            outcome = event.state
        elif isinstance(event, Complete):
            outcome = "ok" if event.ok else "perm" if event.force_permanent else "fail"
        elif isinstance(event, TimerFired) and event.kind == "step_timeout":
            outcome = "timeout"
        if outcome is None:
            return
        step, action = event.step, event.action  # type: ignore[attr-defined]
        record = old.steps[step]
        attempt = record.attempt if action == "invoke" else record.comp_attempt
        self.results[tx_id, step, action, attempt] = (seq, outcome)

    def start(self, input: Any = None) -> Driver:
        """Create the root transaction and apply ``Begin``."""
        self._new_tx(self.root_id, self.root_workflow, None)
        self.apply(self.root_id, Begin(now=self.clock, input=encode(input)))
        return self

    def run(self, input: Any = None) -> Driver:
        """Start the root transaction and deliver everything until nothing is outstanding."""
        self.start(input)
        return self.drain()

    def drain(self) -> Driver:
        """Deliver outstanding results and timers until none is left."""
        rounds = 0
        while True:
            if self.cancel_at is not None and rounds >= self.cancel_at:
                self.cancel_at = None
                self.apply(self.root_id, Cancel(now=self.clock, abort=self.cancel_abort))
                continue
            if not (self.pending or self.timers):
                if self.cancel_at is not None:  # cancel once it is all over
                    rounds = self.cancel_at
                    continue
                return self
            rounds += 1
            assert self.seq < self.max_applies, "the transaction does not settle"
            self.step()

    def step(self) -> None:
        """Deliver one outstanding result or timer (or a duplicate of an earlier one)."""
        rng = self.rng
        if rng is None:
            if self.pending:
                self.deliver(self.pending.pop(0))
            else:
                self.timers.sort(key=lambda p: p.event.now)
                self.deliver(self.timers.pop(0))
            return
        if self.delivered and rng.random() < self.duplicates:
            self.redeliver(rng.choice(self.delivered))
            return
        candidates = len(self.pending) + len(self.timers)
        i = rng.randrange(candidates)
        if i < len(self.pending):
            self.deliver(self.pending.pop(i))
        else:
            self.deliver(self.timers.pop(i - len(self.pending)))

    def deliver(self, item: _Pending) -> None:
        event = item.event
        if isinstance(event, TimerFired):
            self.clock = max(self.clock, event.now)
        else:
            self.clock += _DURATION
            event = msgspec.structs.replace(event, now=self.clock)
        item = dataclasses.replace(item, event=event)
        self.delivered.append(item)
        self.apply(item.tx, event)

    def redeliver(self, item: _Pending) -> None:
        """A duplicate of an earlier event, or a different answer for an answered attempt."""
        rng = self.rng
        assert rng is not None
        event = msgspec.structs.replace(item.event, now=max(self.clock, item.event.now))
        kind = "duplicate"
        if item.key is not None and rng.random() < 0.5:
            kind = "stale"
            tx, step, action, attempt = item.key
            if isinstance(event, ChildFinished):
                state = rng.choice(sorted(FINAL))
                event = msgspec.structs.replace(event, state=state)
            else:
                outcomes = INVOKE_OUTCOMES if action == "invoke" else COMP_OUTCOMES
                event = self._result(tx, step, action, attempt, rng.choice(outcomes)).event
        self.apply(item.tx, event, kind)

    # ------------------------------------------------------------------- commands
    def command(self, tx: Tx, command: Command, now: float, seq: int) -> None:
        if isinstance(command, Invoke):
            self.invokes.append((seq, tx.id, command))
            n = self.calls.get((command.step, command.action), 0)
            self.calls[command.step, command.action] = n + 1
            table = self.script if command.action == "invoke" else self.comp_script
            outcomes = table.get(command.step, ())
            outcome = outcomes[n] if n < len(outcomes) else "ok"
            if command.action == "invoke" and command.step in self.awaiting:
                outcome = "await"
            self.pending.append(
                self._result(tx.id, command.step, command.action, command.attempt, outcome)
            )
        elif isinstance(command, StartChild):
            self.children.append((seq, tx.id, command))
            assert command.transaction_id not in self.txs, f"child started twice: {command}"
            child = self._new_tx(
                command.transaction_id,
                self.workflows[command.workflow],
                (tx.id, command.step, command.attempt),
            )
            link = ParentLink(
                workflow=tx.workflow.name,
                transaction_id=tx.id,
                step=command.step,
                attempt=command.attempt,
            )
            self.apply(child.id, Begin(now=now, input=command.input, parent=link))
        elif isinstance(command, CancelChild):
            self.children.append((seq, tx.id, command))
            child = self.txs[command.transaction_id]
            if command.abort:
                # the parent timed out (or was aborted) while the child ran: the child
                # compensates itself; its next Finished answers the parent's invoke
                self.apply(child.id, Cancel(now=now, abort=True))
                return
            # compensation: only of a child that reported `done` (it may have been aborted
            # since, while that report was on its way)
            assert child.finished[:1] == ["done"], f"compensating a child that failed: {command}"
            child.cancel_attempt = command.attempt
            # as the coordinator does: the child learns which compensation attempt asks ...
            applied = self.apply(child.id, Cancel(now=now, parent_attempt=command.attempt))
            assert child.state.parent_comp_attempt == command.attempt
            final = child.state.status in FINAL
            if final and not any(isinstance(c, Finished) for c in applied.commands):
                # ... and a child that is over already answers at once
                child.cancel_attempt = None
                self.pending.append(self._child_finished(child, "compensate", command.attempt))
        elif isinstance(command, SetTimer):
            self.timers_set.append((seq, tx.id, command, now))
            event = TimerFired(
                now=command.at,
                kind=command.kind,
                step=command.step,
                action=command.action,
                attempt=command.attempt,
            )
            self.timers.append(_Pending(tx.id, event))
        elif isinstance(command, Abort):
            self.aborts.append((seq, tx.id, command))
            key = (tx.id, command.step, command.action, command.attempt)
            for i, item in enumerate(self.pending):
                if item.key == key:
                    self.pending[i] = self._result(*key, "abort")
                    break
            else:
                raise AssertionError(f"Abort for a handler that is not running: {command}")
        elif isinstance(command, Finished):
            tx.finished.append(command.state)
            assert command.state in FINAL, command
            assert tx.state.status == command.state, (tx.state.status, command)
            if tx.parent is not None:
                if tx.cancel_attempt is not None:
                    self.pending.append(self._child_finished(tx, "compensate", tx.cancel_attempt))
                    tx.cancel_attempt = None
                else:
                    self.pending.append(self._child_finished(tx, "invoke", tx.parent[2]))
        elif isinstance(command, Emit):
            self.emitted.append((tx.id, command))
        elif isinstance(command, Reject):
            self.rejects.append((seq, tx.id, command))
        elif isinstance(command, PublishHook):
            self.hooks.append((tx.id, command))
        else:  # pragma: no cover - a new command kind
            raise AssertionError(f"unknown command {command!r}")

    def _child_finished(self, child: Tx, action: str, attempt: int) -> _Pending:
        """The ``ChildFinished`` that tells the parent how ``child`` ended."""
        assert child.parent is not None
        parent, step, _ = child.parent
        event = ChildFinished(
            now=self.clock,
            step=step,
            attempt=attempt,
            action=action,
            state=child.state.status,
            result=child.state.result,
            error=child.state.errors[0] if child.state.errors else None,
        )
        return _Pending(parent, event, (parent, step, action, attempt), child.state.status)

    def _new_tx(self, tx_id: str, wf: Workflow, parent: tuple[str, str, int] | None) -> Tx:
        from orchestrator._transaction import new_state

        graph = wf.graph
        tx = Tx(tx_id, wf, graph, new_state(graph, tx_id), parent)
        self.txs[tx_id] = tx
        return tx

    def _result(self, tx: str, step: str, action: str, attempt: int, outcome: str) -> _Pending:
        """The event that answers ``attempt`` of ``action`` of ``step`` with ``outcome``."""
        now = self.clock
        key = (tx, step, action, attempt)
        error = StepError(
            step=step,
            action=action,
            type="StepTimeoutError" if outcome in ("timeout", "abort") else "RuntimeError",
            message=f"{step} {action} attempt {attempt}: {outcome}",
            attempt=attempt,
        )
        custom = step in self.custom_comp
        event: Event
        if outcome == "ok" and action == "invoke":
            event = StepDone(
                now=now,
                step=step,
                attempt=attempt,
                output=encode(output_of(step, attempt)),
                comp_input=encode(comp_input_of(step)) if custom else None,
            )
        elif outcome == "ok":
            event = StepDone(now=now, step=step, action=action, attempt=attempt)
        elif outcome == "skip":
            event = StepDone(now=now, step=step, attempt=attempt, skipped=True)
        elif outcome == "await":
            event = StepDone(now=now, step=step, attempt=attempt, awaiting=True)
        elif outcome == "perm":
            event = StepFailed(
                now=now,
                step=step,
                action=action,
                attempt=attempt,
                error=error,
                permanent=True,
                comp_input=encode(perm_input_of(step)) if custom and action == "invoke" else None,
            )
        elif outcome in ("fail", "timeout", "abort"):
            event = StepFailed(
                now=now,
                step=step,
                action=action,
                attempt=attempt,
                error=error,
                timeout=outcome != "fail",
            )
        else:  # pragma: no cover - a typo in a script
            raise AssertionError(f"unknown outcome {outcome!r}")
        return _Pending(tx, event, key, outcome)

    # ----------------------------------------------------------------------- views
    def invokes_of(self, tx: str | None = None, action: str | None = None) -> list[Invoke]:
        """The ``Invoke`` commands of a transaction (the root by default), in order."""
        tx = self.root_id if tx is None else tx
        return [c for _, t, c in self.invokes if t == tx and (action is None or c.action == action)]

    def child_ids(self, step: str, tx: str | None = None) -> list[str]:
        """The ids of the nested transactions started for ``step``, attempt by attempt."""
        tx = self.root_id if tx is None else tx
        return [
            c.transaction_id
            for _, t, c in self.children
            if t == tx and isinstance(c, StartChild) and c.step == step
        ]

    def trace(self, tx: str | None = None) -> list[tuple[str, str]]:
        """(action, step) of every ``Invoke`` of a transaction, in order."""
        return [(c.action, c.step) for c in self.invokes_of(tx)]

    def events(self, tx: str | None = None) -> list[str]:
        """The lifecycle event types emitted by a transaction."""
        tx = self.root_id if tx is None else tx
        return [e.event.type for t, e in self.emitted if t == tx]
