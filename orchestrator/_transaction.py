"""The transaction state machine: ``apply(graph, state, event) -> (state, commands)``.

Pure and synchronous: no I/O, no clock (time arrives in each event), no randomness. The
coordinator actor applies events, persists the state and carries out the commands. The input
state is never modified: records are copied on write, so an old state can be replayed freely.

The rules are those of DESIGN.md section 3; the comments name the ones that are not obvious.
"""

from __future__ import annotations

import linecache
from collections.abc import Iterable
from typing import Any

import msgspec

from ._codec import EMPTY_MAP, NONE, decode, encode_value
from ._errors import WorkflowTimeoutError
from ._graph import INPUT, Graph, Node, Ref, Resolver
from ._types import LifecycleEvent, StepError, StepInfo, StepState, TransactionState, WorkflowResult

__all__ = [
    "FINAL_STATES",
    "Abort",
    "Begin",
    "Cancel",
    "CancelChild",
    "ChildFinished",
    "ChildSuspended",
    "Command",
    "Complete",
    "Emit",
    "Event",
    "Finished",
    "Invoke",
    "ParentLink",
    "PublishHook",
    "Reject",
    "Resume",
    "RetryStep",
    "SetTimer",
    "StartChild",
    "StepDone",
    "StepFailed",
    "StepRecord",
    "TimerFired",
    "TxState",
    "apply",
    "apply_all",
    "error_from_exception",
    "is_outstanding",
    "is_settled",
    "new_state",
    "to_result",
]

INVOKE = "invoke"
COMPENSATE = "compensate"

# invoke states
NOT_STARTED = "not_started"
INVOKING = "invoking"
DONE = "done"
FAILED = "failed"
TIMEOUT = "timeout"
SKIPPED = "skipped"
SKIPPED_FAILURE = "skipped_failure"
# compensation states
DORMANT = "dormant"
PENDING = "pending"
COMPENSATING = "compensating"
REVERTED = "reverted"

# transaction states
T_NOT_STARTED = TransactionState.NOT_STARTED.value
T_INVOKING = TransactionState.INVOKING.value
T_WAITING = TransactionState.WAITING_TO_COMPENSATE.value
T_COMPENSATING = TransactionState.COMPENSATING.value
T_DONE = TransactionState.DONE.value
T_REVERTED = TransactionState.REVERTED.value
T_FAILED = TransactionState.FAILED.value
FINAL_STATES = frozenset((T_DONE, T_REVERTED, T_FAILED))
"""The transaction states nothing follows: ``done``, ``reverted``, ``failed``."""
_FINAL = FINAL_STATES
_PASS = frozenset((DONE, SKIPPED, SKIPPED_FAILURE))
_ENDED = frozenset((FAILED, TIMEOUT))
"""Failed for good: passable only when the step's config says to go on."""
_UNDOING = frozenset((PENDING, COMPENSATING))
"""Invoke states that let the steps after a step run."""


# ------------------------------------------------------------------------------------- state
class ParentLink(msgspec.Struct, frozen=True, kw_only=True):
    """The step of a parent transaction that a nested transaction runs for."""

    workflow: str
    transaction_id: str
    step: str
    attempt: int


class StepRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a transaction knows about one of its steps."""

    state: str = NOT_STARTED
    comp: str = DORMANT
    attempt: int = 0
    comp_attempt: int = 0
    failures: int = 0
    comp_failures: int = 0
    running: bool = False
    """A handler (or nested transaction) is running for the current attempt."""
    awaiting: bool = False
    """An async handler returned: the step waits for ``set_step_success``/``failure``."""
    retry_at: float | None = None
    """A retry of the current action is due at this time."""
    output: bytes | None = None
    comp_input: bytes | None = None
    started_at: float | None = None
    finished_at: float | None = None
    child: str | None = None
    child_state: str | None = None


class TxState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The whole persisted state of a transaction."""

    workflow: str
    transaction_id: str
    graph_hash: str = ""
    status: str = T_NOT_STARTED
    input: bytes = NONE
    context: bytes = EMPTY_MAP
    steps: dict[str, StepRecord] = msgspec.field(default_factory=dict)
    conditions: dict[str, bool] = msgspec.field(default_factory=dict)
    errors: list[StepError] = msgspec.field(default_factory=list)
    result: bytes | None = None
    created_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    cancelled: bool = False
    parent: ParentLink | None = None
    parent_comp_attempt: int = 0
    """The parent step's compensation attempt that cancelled this (nested) transaction."""
    version: int = 0
    """How many events changed this state (the checkpoint's own revision)."""


def new_state(graph: Graph, transaction_id: str) -> TxState:
    """A fresh, not started transaction of ``graph``."""
    return TxState(
        workflow=graph.name,
        transaction_id=transaction_id,
        graph_hash=graph.definition_hash,
        steps={n.name: StepRecord() for n in graph.nodes},
    )


# ------------------------------------------------------------------------------------ events
class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Something that happened to a transaction, at time ``now``."""

    now: float


class Begin(Event, frozen=True, kw_only=True, tag="begin"):
    input: bytes = NONE
    context: bytes = EMPTY_MAP
    parent: ParentLink | None = None


class StepDone(Event, frozen=True, kw_only=True, tag="step_done"):
    """A handler returned. ``awaiting``: an async handler returned nothing."""

    step: str
    action: str = INVOKE
    attempt: int
    output: bytes | None = None
    comp_input: bytes | None = None
    skipped: bool = False
    awaiting: bool = False


class StepFailed(Event, frozen=True, kw_only=True, tag="step_failed"):
    """A handler raised (``permanent``: no retries; ``timeout``: it ran out of time)."""

    step: str
    action: str = INVOKE
    attempt: int
    error: StepError
    permanent: bool = False
    timeout: bool = False
    comp_input: bytes | None = None


class Complete(Event, frozen=True, kw_only=True, tag="complete"):
    """``set_step_success`` / ``set_step_failure`` from outside."""

    step: str
    action: str = INVOKE
    ok: bool
    output: bytes | None = None
    error: StepError | None = None
    force_permanent: bool = False


class RetryStep(Event, frozen=True, kw_only=True, tag="retry_step"):
    step: str


class TimerFired(Event, frozen=True, kw_only=True, tag="timer"):
    kind: str
    """``retry``, ``step_timeout`` or ``workflow_timeout``."""
    step: str | None = None
    action: str = INVOKE
    attempt: int = 0


class Cancel(Event, frozen=True, kw_only=True, tag="cancel"):
    """Compensate the transaction; ``parent_attempt`` > 0 when a parent step asks it."""

    parent_attempt: int = 0
    abort: bool = False
    """Cancel the handlers in flight instead of letting them finish (a parent timed out)."""
    parent: ParentLink | None = None
    """The parent step asking (so it can be answered even if this transaction is gone)."""


class Resume(Event, frozen=True, kw_only=True, tag="resume"):
    """Send the commands of the attempts in flight again (a new owner took the transaction
    over, or its coordinator restarted from the last checkpoint)."""


class ChildSuspended(Event, frozen=True, kw_only=True, tag="child_suspended"):
    """A nested transaction now only waits for external completions."""

    step: str
    attempt: int


class ChildFinished(Event, frozen=True, kw_only=True, tag="child_finished"):
    """A nested transaction reached a final state (``action``: what the parent asked of it)."""

    step: str
    attempt: int
    action: str = INVOKE
    state: str
    result: bytes | None = None
    error: StepError | None = None


# ---------------------------------------------------------------------------------- commands
class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Something the coordinator must do after persisting the new state."""


class Invoke(Command, frozen=True, kw_only=True, tag="invoke"):
    step: str
    action: str
    attempt: int
    input: bytes
    timeout: float | None = None
    async_: bool = False


class StartChild(Command, frozen=True, kw_only=True, tag="start_child"):
    step: str
    attempt: int
    workflow: str
    transaction_id: str
    input: bytes


class CancelChild(Command, frozen=True, kw_only=True, tag="cancel_child"):
    step: str
    attempt: int
    workflow: str
    transaction_id: str
    abort: bool = False


class Abort(Command, frozen=True, kw_only=True, tag="abort"):
    """Cancel a running handler; the executor reports a timeout failure."""

    step: str
    action: str
    attempt: int


class SetTimer(Command, frozen=True, kw_only=True, tag="set_timer"):
    at: float
    kind: str
    step: str | None = None
    action: str = INVOKE
    attempt: int = 0


class PublishHook(Command, frozen=True, kw_only=True, tag="publish_hook"):
    hook: str
    payload: bytes


class Emit(Command, frozen=True, kw_only=True, tag="emit"):
    event: LifecycleEvent


class Finished(Command, frozen=True, kw_only=True, tag="finished"):
    state: str


class Reject(Command, frozen=True, kw_only=True, tag="reject"):
    """An external request that does not apply (the reason is for the caller)."""

    message: str


# ---------------------------------------------------------------------------------- machine
def format_traceback(exc: BaseException) -> str:
    """The traceback text of ``exc``, in the usual layout.

    Cheaper than :func:`traceback.format_exception`, which on 3.11 compiles each source line to
    place its carets: a failing step pays for its traceback on the hot path. Chained causes are
    summarised in one line each.
    """
    lines = ["Traceback (most recent call last):\n"]
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}\n')
        source = linecache.getline(code.co_filename, tb.tb_lineno).strip()
        if source:
            lines.append(f"    {source}\n")
        tb = tb.tb_next
    lines.append(_exception_line(exc))
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        lines.append("caused by: " + _exception_line(cause))
        cause = cause.__cause__ or cause.__context__
    return "".join(lines)


def _exception_line(exc: BaseException) -> str:
    """``module.Type: message`` (the last line of a traceback), without TracebackException."""
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__"):
        name = f"{cls.__module__}.{name}"
    message = str(exc)
    return f"{name}: {message}\n" if message else f"{name}\n"


def error_from_exception(exc: BaseException, step: str, action: str, attempt: int) -> StepError:
    """A :class:`StepError` with the exception's type, message and traceback text."""
    return StepError(
        step=step,
        action=action,
        type=type(exc).__name__,
        message=str(exc),
        traceback=format_traceback(exc),
        attempt=attempt,
    )


def apply(
    graph: Graph, state: TxState, event: Event, *, events: bool = True
) -> tuple[TxState, list[Command]]:
    """Apply ``event`` to ``state``: the new state and the commands to carry out.

    ``events=False`` leaves out the :class:`Emit` commands (nobody listens to lifecycle events).
    """
    machine = _Machine(graph, state, events)
    machine.handle(event)
    if machine.changed:
        machine.state.version += 1
    return machine.state, machine.commands


def apply_all(
    graph: Graph,
    state: TxState,
    batch: list[Event],
    *,
    now: float | None = None,
    events: bool = True,
) -> tuple[TxState, list[Command]]:
    """Apply several events in order, then make progress once.

    The same outcome as applying them one by one (progress is monotonic: a step that became
    ready stays ready), at the cost of one pass over the graph instead of one per event, which
    matters when the results of a wide ``parallelize`` arrive together. ``now`` overrides the
    events' own times (the coordinator's clock is the one the state runs on).
    """
    machine = _Machine(graph, state, events)
    machine.deferring = True
    for event in batch:
        machine.handle(event, now)
    machine.deferring = False
    if machine.pending:
        machine.advance()
    if machine.changed:
        machine.state.version += 1
    return machine.state, machine.commands


class _Machine(Resolver):
    __slots__ = (
        "changed",
        "commands",
        "copied",
        "deferring",
        "events",
        "graph",
        "now",
        "pending",
        "state",
    )

    def __init__(self, graph: Graph, state: TxState, events: bool = True) -> None:
        self.graph = graph
        self.events = events
        self.deferring = False
        self.pending = False
        # Shallow copy; `errors` and `conditions` are copied on their first write.
        self.state = msgspec.structs.replace(state, steps=dict(state.steps))
        self.copied: set[str] = set()
        self.commands: list[Command] = []
        self.changed = False
        self.now = 0.0

    # -- helpers
    def rec(self, name: str) -> StepRecord:
        """The record of ``name``, copied before the first write of this event."""
        steps = self.state.steps
        if name in self.copied:
            return steps[name]
        record = steps.get(name)
        record = StepRecord() if record is None else msgspec.structs.replace(record)
        steps[name] = record
        self.copied.add(name)
        return record

    def emit(
        self,
        kind: str,
        step: str | None = None,
        attempt: int | None = None,
        error: StepError | None = None,
        **extra: Any,
    ) -> None:
        if not self.events:
            return
        s = self.state
        self.commands.append(
            Emit(
                event=LifecycleEvent(
                    type=kind,
                    workflow=s.workflow,
                    transaction_id=s.transaction_id,
                    timestamp=self.now,
                    step=step,
                    attempt=attempt,
                    error=error,
                    **extra,
                )
            )
        )

    def add_error(self, error: StepError) -> None:
        state = self.state
        state.errors = [*state.errors, error]

    # -- Resolver
    def source(self, name: str) -> Any:
        if name == INPUT:
            return decode(self.state.input)
        record = self.state.steps.get(name)
        if record is None or record.output is None:
            return None
        return decode(record.output)

    def condition(self, block: str) -> bool:
        return self.state.conditions.get(block, False)

    def hook_result(self, hook: str) -> Any:
        handlers = self.graph.hook_handlers.get(hook, ())
        values = [self.source(h) for h in handlers]
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def resolve_bytes(self, node_input: Any, what: str, name: str | None = None) -> bytes:
        """``node_input`` resolved and encoded; an error names ``what`` (and ``name``)."""
        # Fast path: a plain reference hands over the stored bytes (the consumer decodes its own
        # copy); anything else is resolved and encoded once.
        if type(node_input) is Ref and not node_input.path:
            if node_input.source == INPUT:
                return self.state.input
            record = self.state.steps.get(node_input.source)
            return NONE if record is None or record.output is None else record.output
        return encode_value(node_input.resolve(self), what, name)

    # -- dispatch
    def handle(self, event: Event, now: float | None = None) -> None:
        self.now = event.now if now is None else now
        state = self.state
        if isinstance(event, StepDone | StepFailed):
            self.on_result(event)
        elif isinstance(event, Begin):
            if state.status != T_NOT_STARTED:
                return
            self.changed = True
            state.status = T_INVOKING
            state.input = event.input
            state.context = event.context
            state.parent = event.parent
            state.created_at = self.now
            if self.events:
                self.emit("begin")
            if self.graph.timeout:
                state.deadline = self.now + self.graph.timeout
                self.commands.append(SetTimer(at=state.deadline, kind="workflow_timeout"))
            self.advance()
        elif isinstance(event, Complete):
            self.on_complete(event)
        elif isinstance(event, TimerFired):
            self.on_timer(event)
        elif isinstance(event, ChildFinished):
            self.on_child(event)
        elif isinstance(event, ChildSuspended):
            node = self.graph.index.get(event.step)
            record = self.current(event.step, INVOKE, event.attempt)
            subflow = node is not None and node.kind == "subflow"
            if subflow and record is not None and not record.awaiting:
                self.changed = True
                self.rec(event.step).awaiting = True
        elif isinstance(event, Cancel):
            self.on_cancel(event)
        elif isinstance(event, RetryStep):
            self.on_retry_step(event)
        elif isinstance(event, Resume):
            self.resume()

    # -- results
    def current(self, step: str, action: str, attempt: int) -> StepRecord | None:
        """The step's record if ``attempt`` of ``action`` is the one still outstanding."""
        record = self.state.steps.get(step)
        if record is None or step not in self.graph.index:
            return None
        if action == INVOKE:
            if record.state != INVOKING or record.attempt != attempt:
                return None
        elif record.comp != COMPENSATING or record.comp_attempt != attempt:
            return None
        if not (record.running or record.awaiting):
            return None
        return record

    def on_result(self, event: StepDone | StepFailed) -> None:
        current = self.current(event.step, event.action, event.attempt)
        if current is None:
            return  # a duplicate, or an answer for an attempt that is no longer current
        if isinstance(event, StepDone) and event.awaiting and not current.running:
            return  # the handler already said it awaits
        self.changed = True
        record = self.rec(event.step)
        node = self.graph.index[event.step]
        if isinstance(event, StepDone):
            if event.awaiting:
                record.running = False
                record.awaiting = True
                self.emit("step_awaiting", event.step, event.attempt)
                return
            self.succeed(node, record, event.action, event.attempt, event)
        else:
            self.fail(node, record, event)
        self.advance()

    def succeed(
        self, node: Node, record: StepRecord, action: str, attempt: int, event: StepDone
    ) -> None:
        record.running = record.awaiting = False
        record.finished_at = self.now
        if action == COMPENSATE:
            record.comp = REVERTED
            if self.events:
                self.emit("compensate_step_success", node.name, attempt)
            return
        if event.skipped:
            record.state = SKIPPED
            self.emit("step_skipped", node.name, attempt)
            return
        record.state = DONE
        record.output = NONE if event.output is None else event.output
        record.comp_input = record.output if event.comp_input is None else event.comp_input
        if self.events:
            self.emit("step_success", node.name, attempt)

    def fail(self, node: Node, record: StepRecord, event: StepFailed) -> None:
        record.running = record.awaiting = False
        config = node.config
        if event.action == COMPENSATE:
            if not event.permanent and record.comp_failures < config.max_retries:
                record.comp_failures += 1
                self.emit("compensate_step_failure", node.name, event.attempt, event.error)
                self.schedule_retry(node, record, COMPENSATE, record.comp_failures)
                return
            record.comp = FAILED
            record.finished_at = self.now
            self.add_error(event.error)
            self.emit("compensate_step_failure", node.name, event.attempt, event.error)
            return
        status = self.state.status
        if not event.permanent and status == T_INVOKING and record.failures < config.max_retries:
            record.failures += 1
            self.emit("step_failure", node.name, event.attempt, event.error)
            self.schedule_retry(node, record, INVOKE, record.failures)
            return
        self.fail_for_good(node, record, event.error, timeout=event.timeout)
        if event.comp_input is not None:
            record.comp_input = event.comp_input

    def fail_for_good(
        self, node: Node, record: StepRecord, error: StepError, *, timeout: bool = False
    ) -> None:
        record.running = record.awaiting = False
        record.retry_at = None
        record.state = TIMEOUT if timeout else FAILED
        record.finished_at = self.now
        self.add_error(error)
        self.emit("step_failure", node.name, record.attempt or None, error)
        if self.state.status != T_INVOKING:
            return
        config = node.config
        if config.continue_on_permanent_failure:
            return
        if config.skip_on_permanent_failure:
            self.skip_after(node, config.skip_on_permanent_failure)
            return
        self.state.status = T_WAITING

    def skip_after(self, node: Node, until: bool | str) -> None:
        successors = self.graph.successors[node.name]
        if isinstance(until, str) and until in self.graph.index:
            spared = {until} | self.graph.successors[until]
            successors = successors - spared
        for name in successors:
            record = self.rec(name)
            if record.state == NOT_STARTED:
                record.state = SKIPPED_FAILURE
                self.emit("step_skipped", name)

    def schedule_retry(self, node: Node, record: StepRecord, action: str, failures: int) -> None:
        delay = node.config.retry_delay(failures)
        if delay <= 0:
            self.start(node, record, action)
            return
        record.retry_at = self.now + delay
        attempt = record.attempt if action == INVOKE else record.comp_attempt
        self.commands.append(
            SetTimer(
                at=record.retry_at, kind="retry", step=node.name, action=action, attempt=attempt
            )
        )

    # -- external completion, timers, children, cancel
    def on_complete(self, event: Complete) -> None:
        node = self.graph.index.get(event.step)
        record = self.state.steps.get(event.step)
        if node is None or record is None:
            self.commands.append(
                Reject(message=f"workflow {self.graph.name!r} has no step {event.step!r}")
            )
            return
        if event.action == INVOKE:
            waiting = record.state == INVOKING and (
                record.awaiting or (record.running and node.name in self.graph.async_nodes)
            )
            attempt = record.attempt
        else:
            waiting = record.comp == COMPENSATING and (
                record.awaiting or (record.running and node.config.compensate_async)
            )
            attempt = record.comp_attempt
        if not waiting:
            shown = record.state if event.action == INVOKE else record.comp
            self.commands.append(
                Reject(
                    message=f"step {event.step!r} ({event.action}) of transaction "
                    f"{self.state.transaction_id!r} is not awaiting a response (state {shown})"
                )
            )
            return
        if event.ok:
            self.on_result(
                StepDone(
                    now=self.now,
                    step=event.step,
                    action=event.action,
                    attempt=attempt,
                    output=event.output,
                )
            )
        else:
            error = event.error or StepError(
                step=event.step, action=event.action, type="StepFailure", message="step failed"
            )
            self.on_result(
                StepFailed(
                    now=self.now,
                    step=event.step,
                    action=event.action,
                    attempt=attempt,
                    error=error,
                    permanent=event.force_permanent,
                )
            )

    def on_retry_step(self, event: RetryStep) -> None:
        node = self.graph.index.get(event.step)
        record = self.state.steps.get(event.step)
        # An async step may be retried whether its handler returned (it awaits an answer) or
        # still runs in the background, as set_step_success/failure accept it; a late answer of
        # the old attempt is then stale and ignored.
        if (
            node is None
            or record is None
            or record.state != INVOKING
            or not (record.awaiting or (record.running and node.name in self.graph.async_nodes))
        ):
            self.commands.append(
                Reject(message=f"step {event.step!r} is not awaiting a response; nothing to retry")
            )
            return
        self.changed = True
        self.start(node, self.rec(event.step), INVOKE)

    def on_timer(self, event: TimerFired) -> None:
        state = self.state
        if event.kind == "workflow_timeout":
            if state.status != T_INVOKING or state.deadline is None or self.now < state.deadline:
                return
            self.changed = True
            error = StepError(
                step=self.graph.name,
                action=INVOKE,
                type=WorkflowTimeoutError.__name__,
                message=f"workflow {self.graph.name!r} timed out after {self.graph.timeout} s",
            )
            self.add_error(error)
            self.emit("timeout", error=error)
            state.status = T_WAITING
            self.abort_in_flight(TIMEOUT)
            self.advance()
            return
        if event.step is None or event.step not in self.graph.index:
            return
        node = self.graph.index[event.step]
        record = state.steps[event.step]
        if event.kind == "retry":
            if record.retry_at is None or self.now < record.retry_at:
                return
            attempt = record.attempt if event.action == INVOKE else record.comp_attempt
            if attempt != event.attempt:
                return
            self.changed = True
            w = self.rec(event.step)
            w.retry_at = None
            if event.action == INVOKE and state.status != T_INVOKING:
                self.advance()  # compensation began: the retry never happens
                return
            self.start(node, w, event.action)
            self.advance()
        elif event.kind == "step_timeout":
            if self.current(event.step, event.action, event.attempt) is None:
                return
            error = StepError(
                step=event.step,
                action=event.action,
                type="StepTimeoutError",
                message=f"step {event.step!r} timed out after {node.config.timeout} s",
                attempt=event.attempt,
            )
            self.on_result(
                StepFailed(
                    now=self.now,
                    step=event.step,
                    action=event.action,
                    attempt=event.attempt,
                    error=error,
                    timeout=True,
                )
            )

    def on_child(self, event: ChildFinished) -> None:
        node = self.graph.index.get(event.step)
        if node is None or node.kind != "subflow":
            return
        if self.current(event.step, event.action, event.attempt) is None:
            return
        w = self.rec(event.step)
        if event.action == INVOKE:
            w.child_state = event.state
        ok = event.state == (T_DONE if event.action == INVOKE else T_REVERTED)
        if ok:
            self.on_result(
                StepDone(
                    now=self.now,
                    step=event.step,
                    action=event.action,
                    attempt=event.attempt,
                    output=event.result,
                )
            )
            return
        error = event.error or StepError(
            step=event.step,
            action=event.action,
            type="NestedWorkflowError",
            message=f"nested workflow {node.workflow!r} ended {event.state}",
            attempt=event.attempt,
        )
        error = msgspec.structs.replace(error, step=event.step, action=event.action)
        self.on_result(
            StepFailed(
                now=self.now,
                step=event.step,
                action=event.action,
                attempt=event.attempt,
                error=error,
                # A child that ended `failed` left effects behind: running it again would not
                # undo them, so the parent step fails for good.
                permanent=event.action == COMPENSATE or event.state == T_FAILED,
            )
        )

    def on_cancel(self, event: Cancel) -> None:
        state = self.state
        if event.parent_attempt:
            self.changed = True
            state.parent_comp_attempt = event.parent_attempt
        if state.status == T_NOT_STARTED:
            self.changed = True
            state.cancelled = True
            state.status = T_REVERTED
            state.finished_at = self.now
            self.emit("finish", state=T_REVERTED)
            self.commands.append(Finished(state=T_REVERTED))
            return
        if state.status not in (T_INVOKING, T_DONE):
            return  # already compensating, or finished without effects left to undo
        self.changed = True
        state.cancelled = True
        state.finished_at = None
        state.status = T_WAITING
        if event.abort:
            self.abort_in_flight(FAILED)
        # else: handlers in flight finish; begin_compensation ends steps that only wait.
        self.advance()

    def abort_in_flight(self, ended: str) -> None:
        """Cancel running handlers and nested transactions; end the steps that only wait."""
        for node in self.graph.nodes:
            record = self.state.steps[node.name]
            if record.state != INVOKING:
                continue
            if record.running and node.kind == "step":
                self.commands.append(Abort(step=node.name, action=INVOKE, attempt=record.attempt))
            elif record.running and node.kind == "subflow" and record.child is not None:
                # The child compensates itself and reports `reverted`.
                assert node.workflow is not None
                self.commands.append(
                    CancelChild(
                        step=node.name,
                        attempt=0,
                        workflow=node.workflow,
                        transaction_id=record.child,
                        abort=True,
                    )
                )
            elif not record.running:  # awaiting, or waiting to retry
                w = self.rec(node.name)
                w.awaiting = False
                w.retry_at = None
                w.state = ended
                w.finished_at = self.now

    # -- progress
    def start(self, node: Node, record: StepRecord, action: str) -> None:
        """Run (or re-run) ``action`` of ``node``: emit the command for its next attempt."""
        record.retry_at = None
        record.running = True
        record.awaiting = False
        if record.started_at is None:
            record.started_at = self.now
        tx = self.state.transaction_id
        if action == INVOKE:
            record.state = INVOKING
            record.attempt += 1
            attempt = record.attempt
            if node.kind == "subflow":
                try:
                    data = self.resolve_bytes(node.input, "input of step", node.name)
                except Exception as exc:
                    self.fail_for_good(
                        node, record, error_from_exception(exc, node.name, action, attempt)
                    )
                    return
                # "<parent tx>:<step>[:attempt-<n>]" (the step is "<child>-as-step" unless renamed):
                # a nested id names its whole path, so no two uses, attempts or depths collide.
                child = f"{tx}:{node.name}"
                if attempt > 1:
                    child = f"{child}:attempt-{attempt}"
                record.child = child
                self.emit("step_begin", node.name, attempt)
                self.commands.append(self.invoke_command(node, record, data))
                return
            try:
                data = self.resolve_bytes(node.input, "input of step", node.name)
            except Exception as exc:
                self.fail_for_good(
                    node, record, error_from_exception(exc, node.name, action, attempt)
                )
                return
            config = node.config
            if self.events:
                self.emit("step_begin", node.name, attempt)
            self.commands.append(self.invoke_command(node, record, data))
            if config.async_ and config.timeout:
                self.commands.append(
                    SetTimer(
                        at=self.now + config.timeout,
                        kind="step_timeout",
                        step=node.name,
                        attempt=attempt,
                    )
                )
            return
        record.comp = COMPENSATING
        record.comp_attempt += 1
        attempt = record.comp_attempt
        if self.events:
            self.emit("compensate_step_begin", node.name, attempt)
        self.commands.append(self.compensate_command(node, record))

    def invoke_command(self, node: Node, record: StepRecord, data: bytes) -> Command:
        """The command of the current invoke attempt of ``node`` (``data``: its input)."""
        if node.kind == "subflow":
            assert node.workflow is not None
            assert record.child is not None
            return StartChild(
                step=node.name,
                attempt=record.attempt,
                workflow=node.workflow,
                transaction_id=record.child,
                input=data,
            )
        config = node.config
        return Invoke(
            step=node.name,
            action=INVOKE,
            attempt=record.attempt,
            input=data,
            timeout=config.timeout,
            async_=config.async_,
        )

    def compensate_command(self, node: Node, record: StepRecord) -> Command:
        """The command of the current compensation attempt of ``node``."""
        if node.kind == "subflow":
            assert node.workflow is not None
            assert record.child is not None
            return CancelChild(
                step=node.name,
                attempt=record.comp_attempt,
                workflow=node.workflow,
                transaction_id=record.child,
            )
        return Invoke(
            step=node.name,
            action=COMPENSATE,
            attempt=record.comp_attempt,
            input=NONE if record.comp_input is None else record.comp_input,
            async_=node.config.compensate_async,
        )

    def resume(self) -> None:
        """Send again the commands of every attempt in flight; the state does not change.

        After a takeover, or a restart from the last checkpoint, the commands of the turn that
        wrote it may never have left. Sending them again is safe: they carry the same message
        ids (the work queue drops a copy within its duplicate window), an executor may run an
        attempt again (at least once per attempt), and a second result is ignored. Attempts
        waiting for a retry timer, or awaiting an external completion, have nothing in flight.
        """
        if self.state.status in _FINAL or self.state.status == T_NOT_STARTED:
            return
        for node in self.graph.nodes:
            record = self.state.steps[node.name]
            if not record.running or record.retry_at is not None:
                continue
            if record.state == INVOKING:
                try:
                    data = self.resolve_bytes(node.input, "input of step", node.name)
                except Exception:  # it resolved when the attempt started; leave it to timeouts
                    continue
                self.commands.append(self.invoke_command(node, record, data))
            elif record.comp == COMPENSATING:
                self.commands.append(self.compensate_command(node, record))

    def passable(self, name: str) -> bool:
        state = self.state.steps[name].state
        if state in (DONE, SKIPPED, SKIPPED_FAILURE):
            return True
        if state in (FAILED, TIMEOUT):
            config = self.graph.index[name].config
            return bool(config.continue_on_permanent_failure or config.skip_on_permanent_failure)
        return False

    def advance(self) -> None:
        if self.deferring:
            self.pending = True
            return
        state = self.state
        if state.status == T_INVOKING:
            self.dispatch_ready()
            if state.status == T_INVOKING and self.all_settled_forward():
                self.finish_success()
        if state.status == T_WAITING:
            self.begin_compensation()
        if state.status == T_COMPENSATING:
            self.dispatch_compensations()

    def dispatch_ready(self) -> None:
        state = self.state
        steps = state.steps
        for node in self.graph.nodes:
            if state.status != T_INVOKING:
                return
            if steps[node.name].state != NOT_STARTED:
                continue
            ready = True
            for pred in node.after:
                before = steps[pred].state
                if before not in _PASS and (before not in _ENDED or not self.passable(pred)):
                    ready = False
                    break
            if not ready:
                continue
            if node.blocks:
                decided = self.decide_blocks(node)
                if decided is None:  # a predicate raised: the step failed for good
                    continue
                if not decided:
                    record = self.rec(node.name)
                    record.state = SKIPPED
                    self.emit("step_skipped", node.name)
                    continue
            record = self.rec(node.name)
            if node.kind == "hook":
                try:
                    payload = self.resolve_bytes(node.input, "payload of hook", node.name)
                except Exception as exc:
                    record.attempt = 1
                    self.fail_for_good(
                        node, record, error_from_exception(exc, node.name, INVOKE, 1)
                    )
                    continue
                record.state = DONE
                record.attempt = 1
                record.output = payload
                record.started_at = record.finished_at = self.now
                self.commands.append(PublishHook(hook=node.name, payload=payload))
                continue
            self.start(node, record, INVOKE)

    def decide_blocks(self, node: Node) -> bool | None:
        conditions = self.state.conditions
        for block in node.blocks:
            held = conditions.get(block)
            if held is None:
                when = self.graph.whens[block]
                try:
                    held = bool(when.predicate(when.values.resolve(self)))
                except Exception as exc:
                    record = self.rec(node.name)
                    record.attempt = 1
                    error = error_from_exception(exc, node.name, INVOKE, 1)
                    error = msgspec.structs.replace(
                        error, message=f"when block {block!r}: predicate raised: {error.message}"
                    )
                    self.fail_for_good(node, record, error)
                    return None
                conditions = self.state.conditions = {**conditions, block: held}
            if not held:
                return False
        return True

    def all_settled_forward(self) -> bool:
        for record in self.state.steps.values():
            if record.state in (NOT_STARTED, INVOKING):
                return False
        return True

    def finish_success(self) -> None:
        try:
            self.state.result = self.resolve_bytes(self.graph.result, "the workflow result")
        except Exception as exc:
            error = error_from_exception(exc, "<result>", INVOKE, 1)
            self.add_error(error)
            self.state.status = T_WAITING
            return
        self.finish(T_DONE)

    def finish(self, final: str) -> None:
        state = self.state
        state.status = final
        state.finished_at = self.now
        if self.events:
            self.emit("finish", state=final)
        self.commands.append(Finished(state=final))

    def begin_compensation(self) -> None:
        steps = self.state.steps
        for node in self.graph.nodes:
            record = steps[node.name]
            if record.state == INVOKING and not record.running:
                # Waiting for a retry, or for an external completion: that never comes now.
                w = self.rec(node.name)
                w.retry_at = None
                w.awaiting = False
                w.state = FAILED
                w.finished_at = self.now
        for record in steps.values():
            if record.running:
                return  # steps in flight finish first
        self.state.status = T_COMPENSATING
        if self.events:
            self.emit("compensate_begin")
        for node in self.graph.nodes:
            record = steps[node.name]
            if record.state not in (DONE, FAILED, TIMEOUT):
                continue
            w = self.rec(node.name)
            nothing_to_undo = node.kind == "hook" or (
                node.kind == "subflow" and w.child_state in (T_REVERTED, None)
            )
            if node.config.no_compensation or nothing_to_undo:
                w.comp = REVERTED
            elif node.kind == "subflow" and w.child_state == T_FAILED:
                w.comp = FAILED
            else:
                w.comp = PENDING

    def dispatch_compensations(self) -> None:
        steps = self.state.steps
        outstanding = False
        for node in reversed(self.graph.nodes):
            record = steps[node.name]
            if record.comp == COMPENSATING:
                outstanding = True
            elif record.comp == PENDING:
                outstanding = True
                for after in self.graph.successors[node.name]:
                    if steps[after].comp in _UNDOING:
                        break  # a step after this one is still being compensated
                else:
                    self.start(node, self.rec(node.name), COMPENSATE)
        if not outstanding:
            failed = any(r.comp == FAILED for r in steps.values())
            self.finish(T_FAILED if failed else T_REVERTED)


# ------------------------------------------------------------------------------------ views
def is_outstanding(state: TxState, step: str, action: str, attempt: int) -> bool:
    """Whether ``attempt`` of ``action`` of ``step`` still runs: the transaction waits for its
    handler's answer. A command delivered again for anything else (answered, superseded, or
    of a finished transaction) must not run again."""
    if state.status in _FINAL:
        return False
    record = state.steps.get(step)
    if record is None or not record.running:
        return False
    if action == INVOKE:
        return record.state == INVOKING and record.attempt == attempt
    return record.comp == COMPENSATING and record.comp_attempt == attempt


def is_settled(graph: Graph, state: TxState) -> bool:
    """True when only async work remains (``run`` may return with state ``invoking``).

    Every step in flight is an async step (its handler runs in the background, or returned and
    awaits ``set_step_success`` / ``set_step_failure``), or a nested transaction that said it is
    in the same situation; the same holds for compensations.
    """
    if state.status in _FINAL or state.status == T_NOT_STARTED:
        return False
    active = False
    for node in graph.nodes:
        record = state.steps[node.name]
        if record.state == INVOKING:
            if node.kind == "subflow":
                if not record.awaiting:
                    return False
            elif not node.config.async_:
                return False
            active = True
        elif record.comp == COMPENSATING:
            if node.kind == "subflow":
                if not record.awaiting:
                    return False
            elif not node.config.compensate_async:
                return False
            active = True
        elif record.comp == PENDING:
            return False
    return active


_STEP_STATE = {
    NOT_STARTED: StepState.NOT_STARTED,
    INVOKING: StepState.INVOKING,
    DONE: StepState.DONE,
    FAILED: StepState.FAILED,
    TIMEOUT: StepState.TIMEOUT,
    SKIPPED: StepState.SKIPPED,
    SKIPPED_FAILURE: StepState.SKIPPED_FAILURE,
}


_TX_STATE = {s.value: s for s in TransactionState}
"""``TransactionState(value)`` without the enum's call (a tenth of ``to_result``)."""


def _public_state(record: StepRecord) -> StepState:
    if record.comp == COMPENSATING:
        return StepState.COMPENSATING
    if record.comp == REVERTED:
        return StepState.REVERTED
    if record.comp == FAILED:
        return StepState.FAILED
    return _STEP_STATE[record.state]


def to_result(state: TxState, graph: Graph | None = None) -> WorkflowResult:
    """The public picture of a transaction."""
    names: Iterable[str]
    records = state.steps
    names = records if graph is None else graph.index  # composition order
    steps = []
    for name in names:
        record = records.get(name)
        if record is not None:
            steps.append(
                StepInfo(
                    name=name,
                    state=_public_state(record),
                    attempts=record.attempt,
                    compensate_attempts=record.comp_attempt,
                    started_at=record.started_at,
                    finished_at=record.finished_at,
                )
            )
    return WorkflowResult(
        workflow=state.workflow,
        transaction_id=state.transaction_id,
        state=_TX_STATE[state.status],
        result=decode(state.result) if state.result is not None else None,
        errors=tuple(state.errors),
        steps=tuple(steps),
        created_at=state.created_at,
        finished_at=state.finished_at,
    )
