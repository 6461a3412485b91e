"""Step executors: one actor per step name per worker, running invocations concurrently."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import msgspec
import structlog

from orchestrator._codec import decode, encode_value
from orchestrator._errors import (
    PermanentFailure,
    StepDeliveryError,
    StepOutputError,
    StepTimeoutError,
)
from orchestrator._step import SkipStep, Step, StepContext, StepResponse, _HandlerSpec
from orchestrator._transaction import StepDone, StepFailed, error_from_exception, is_outstanding
from orchestrator._types import StepError
from transport import Consumer, Msg, Transport, TransportError, WorkMsg

from ._store import Store
from ._subjects import DEFAULT_ACK_WAIT, Subjects
from ._system import ActorSystem
from .messages import AbortStep, StepCommand, TxEvent, decode_message, encode_message

__all__ = ["DEFAULT_IN_FLIGHT", "DEFAULT_MAX_DELIVER", "ExecutorHost", "StepExecutor"]

log = structlog.get_logger("orchestrator.executor")

DEFAULT_IN_FLIGHT = 1024
"""Un-acked commands a step executor takes at once when the step sets no ``concurrency``."""

DEFAULT_MAX_DELIVER = 10
"""Deliveries of one step command (one attempt) before the step fails for good: a handler that
crashes or kills its worker every time must not be redelivered forever. Deliveries also pile up
while NATS is failing over (a cluster node lost), hence some room."""

DIRECT_TIMEOUT = 3.0
"""Seconds a worker waits for the coordinator to take a step's answer straight away (see
``StepCommand.direct``) before it puts the answer on the work queue instead."""

_Key = tuple[str, str, int]


class _Aborted(Exception):
    pass


class StepExecutor:
    """Runs the handlers of one step name (for every workflow that uses it) on this worker.

    The work queue hands it at most ``concurrency`` un-acked commands; each runs as a job of the
    actor system's dispatcher, which grows its pool so a slow handler never holds up the others.
    Commands handed over in process (:meth:`take`) keep to the same limit.
    """

    def __init__(
        self,
        host: ExecutorHost,
        step: str,
        definitions: Mapping[str, Step],
        concurrency: int | None,
    ) -> None:
        self.host = host
        self.step = step
        self.definitions = dict(definitions)
        self.concurrency = concurrency
        self.running: dict[_Key, anyio.CancelScope] = {}
        self._here: set[tuple[str, str, int]] = set()  # in-process commands taken, not answered
        self._waiting: deque[StepCommand] = deque()  # ... and those over the limit, in order

    def take(self, cmd: StepCommand) -> None:
        """Run a command handed over in process (no work queue); its answer goes to the host's
        ``reply``. A copy of a command still running (a resumed coordinator) is dropped."""
        key = (cmd.transaction_id, cmd.action, cmd.attempt)
        if key in self._here:
            return
        self._here.add(key)
        limit = self.concurrency
        if limit is not None and len(self._here) > limit:
            self._waiting.append(cmd)
        else:
            self.host.system.dispatcher.submit(self._run_here, cmd)

    async def _run_here(self, cmd: StepCommand) -> None:
        try:
            try:
                event = await self.invoke(cmd)
            except Exception as exc:  # a bug of ours, not the handler's: fail the step, say why
                log.exception("step invocation failed", step=cmd.step)
                event = _failed(
                    cmd,
                    self.host.clock(),
                    error_from_exception(exc, cmd.step, cmd.action, cmd.attempt),
                    True,
                )
            reply = self.host.reply
            assert reply is not None
            reply(TxEvent(workflow=cmd.workflow, transaction_id=cmd.transaction_id, event=event))
        finally:
            self._here.discard((cmd.transaction_id, cmd.action, cmd.attempt))
            if self._waiting:
                self.host.system.dispatcher.submit(self._run_here, self._waiting.popleft())

    def deliver(self, work: WorkMsg) -> None:
        """The work-queue handler: run the invocation on the dispatcher."""
        self.host.system.dispatcher.submit(self.run, work)

    def abort(self, cmd: AbortStep) -> None:
        key = (cmd.transaction_id, cmd.action, cmd.attempt)
        scope = self.running.get(key)
        if scope is not None:
            scope.cancel()

    async def run(self, work: WorkMsg) -> None:
        try:
            cmd = decode_message(work.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable step command dropped", step=self.step, error=str(exc))
            await work.term()
            return
        if not isinstance(cmd, StepCommand):
            await work.term()
            return
        host = self.host
        try:
            outstanding = work.num_delivered == 1 or await host.outstanding(cmd)
        except TransportError as exc:
            # The store cannot be read now (NATS failing over): try again in a while, rather
            # than at once, so an outage spends few of the command's deliveries.
            log.warning("cannot check a redelivered command", step=cmd.step, error=str(exc))
            with contextlib.suppress(Exception):
                await work.nak(delay=host.ack_wait)
            return
        if not outstanding:
            # Delivered again (its worker died before acking) but already answered: a step whose
            # result is recorded never runs again.
            log.info("answered step command dropped", step=cmd.step, transaction=cmd.transaction_id)
            await work.ack()
            return
        working = host.working
        # The heartbeat keeps the command ours while the handler runs and until its answer is
        # taken: a command redelivered while the coordinator is still applying the answer (a
        # slow turn, a cluster failing over) would run again, maybe after compensation began.
        working.add(work)
        try:
            try:
                if work.num_delivered > host.max_deliver:
                    event: StepDone | StepFailed = _undeliverable(cmd, host, work.num_delivered)
                else:
                    event = await self.invoke(cmd)
            except anyio.get_cancelled_exc_class():
                # The worker is stopping: hand the command back now rather than after ack_wait.
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await work.nak()
                raise
            data = encode_message(
                TxEvent(workflow=cmd.workflow, transaction_id=cmd.transaction_id, event=event)
            )
            if cmd.direct is None or not await host.hand_over(cmd.direct, data):
                await host.transport.enqueue(
                    cmd.reply_subject,
                    data,
                    msg_id=f"r:{cmd.transaction_id}:{cmd.step}:{cmd.action}:{cmd.attempt}",
                )
        finally:
            working.discard(work)
        await work.ack()

    async def invoke(self, cmd: StepCommand) -> StepDone | StepFailed:
        """Run the handler for ``cmd`` and turn what happened into a state-machine event."""
        step, action, attempt = cmd.step, cmd.action, cmd.attempt
        definition = self.definitions.get(cmd.workflow)
        clock = self.host.clock
        if definition is None:
            return _failed(
                cmd,
                clock(),
                _error(
                    cmd,
                    "ConfigurationError",
                    f"this worker has no handler for step {step!r} of workflow {cmd.workflow!r}",
                ),
                permanent=True,
            )
        spec = definition.invoke if action == "invoke" else definition.compensation
        if spec is None:  # nothing to undo
            return StepDone(now=clock(), step=step, action=action, attempt=attempt)
        tx, container = cmd.transaction_id, self.host.container
        ctx = StepContext._make(cmd.workflow, step, action, tx, attempt, container, cmd.context)
        try:
            value = decode(cmd.input)
            if spec.input_type is not None:
                try:
                    value = msgspec.convert(value, spec.input_type)
                except msgspec.ValidationError as exc:
                    raise PermanentFailure(
                        f"step {step!r}: input does not match "
                        f"{getattr(spec.input_type, '__name__', spec.input_type)}: {exc}"
                    ) from None
            if cmd.abortable:
                key = (tx, action, attempt)
                with anyio.CancelScope() as scope:
                    self.running[key] = scope
                    try:
                        result = await _call_with_timeout(spec, value, ctx, cmd.timeout)
                    finally:
                        self.running.pop(key, None)
                if scope.cancelled_caught:
                    raise _Aborted
            elif cmd.timeout:
                result = await _call_with_timeout(spec, value, ctx, cmd.timeout)
            elif spec.is_async and spec.arity == 2:  # the common case, without extra frames
                result = await spec.fn(value, ctx)
            else:
                result = await _call(spec, value, ctx)
        except _Aborted:
            return _failed(
                cmd,
                clock(),
                _error(
                    cmd,
                    "WorkflowTimeoutError",
                    f"step {step!r} was cancelled: its transaction (or a parent) timed out",
                ),
                permanent=True,
                timeout=True,
            )
        except _TimedOut:
            return _failed(
                cmd,
                clock(),
                _error(
                    cmd,
                    StepTimeoutError.__name__,
                    f"step {step!r} timed out after {cmd.timeout} s (handler cancelled)",
                ),
                timeout=True,
            )
        except PermanentFailure as exc:
            comp_input = None
            if exc.compensate_input is not None:
                try:
                    comp_input = encode_value(
                        exc.compensate_input, f"compensate_input of step {step!r}"
                    )
                except TypeError as enc:
                    return _failed(
                        cmd, clock(), _error(cmd, StepOutputError.__name__, str(enc)), True
                    )
            return _failed(
                cmd,
                clock(),
                error_from_exception(exc, step, action, attempt),
                permanent=True,
                comp_input=comp_input,
            )
        except Exception as exc:
            return _failed(cmd, clock(), error_from_exception(exc, step, action, attempt))
        return _classify(cmd, result, clock())


class _TimedOut(Exception):
    """The step's own ``timeout`` ran out (not a TimeoutError raised by the handler)."""


async def _call_with_timeout(
    spec: _HandlerSpec, value: Any, ctx: StepContext, timeout: float | None
) -> Any:
    if timeout:
        with anyio.move_on_after(timeout):
            return await _call(spec, value, ctx)
        raise _TimedOut  # left the scope without a result: the deadline cancelled the handler
    return await _call(spec, value, ctx)


async def _call(spec: _HandlerSpec, value: Any, ctx: StepContext) -> Any:
    args: tuple[Any, ...] = (value, ctx)[: spec.arity]
    if spec.is_async:
        return await spec.fn(*args)
    return await anyio.to_thread.run_sync(spec.fn, *args, abandon_on_cancel=True)


def _classify(cmd: StepCommand, result: Any, now: float) -> StepDone | StepFailed:
    step, action, attempt = cmd.step, cmd.action, cmd.attempt
    if isinstance(result, SkipStep):
        return StepDone(now=now, step=step, action=action, attempt=attempt, skipped=True)
    if result is None and cmd.async_:
        return StepDone(now=now, step=step, action=action, attempt=attempt, awaiting=True)
    try:
        if isinstance(result, StepResponse):
            output = encode_value(result.output, "the output of step", step)
            if result.compensate_input is result.output:
                comp_input = output
            else:
                comp_input = encode_value(
                    result.compensate_input, f"the compensate_input of step {step!r}"
                )
        else:
            output = comp_input = encode_value(result, "the output of step", step)
    except TypeError as exc:
        return _failed(cmd, now, _error(cmd, StepOutputError.__name__, str(exc)), True)
    return StepDone(
        now=now, step=step, action=action, attempt=attempt, output=output, comp_input=comp_input
    )


def _undeliverable(cmd: StepCommand, host: ExecutorHost, delivered: int) -> StepFailed:
    """The attempt came back too often: every worker that took it died before answering."""
    message = (
        f"step {cmd.step!r} ({cmd.action}, attempt {cmd.attempt}) was delivered {delivered} "
        f"times and no worker answered: each one crashed, was killed or stopped while the "
        f"handler ran; giving up after max_deliver={host.max_deliver}"
    )
    log.error("step command undeliverable", step=cmd.step, transaction=cmd.transaction_id)
    return _failed(cmd, host.clock(), _error(cmd, StepDeliveryError.__name__, message), True)


def _error(cmd: StepCommand, kind: str, message: str) -> StepError:
    """An error of the attempt ``cmd`` asked for."""
    return StepError(
        step=cmd.step, action=cmd.action, type=kind, message=message, attempt=cmd.attempt
    )


def _failed(
    cmd: StepCommand,
    now: float,
    error: StepError,
    permanent: bool = False,
    *,
    timeout: bool = False,
    comp_input: bytes | None = None,
) -> StepFailed:
    return StepFailed(
        now=now,
        step=cmd.step,
        action=cmd.action,
        attempt=cmd.attempt,
        error=error,
        permanent=permanent,
        timeout=timeout,
        comp_input=comp_input,
    )


class ExecutorHost:
    """The step executors of one worker process."""

    def __init__(
        self,
        *,
        transport: Transport,
        system: ActorSystem,
        steps: Mapping[str, Mapping[str, Step]],
        subjects: Subjects,
        container: Any,
        limits: Mapping[str, int | None] | None = None,
        concurrency: int | None = None,
        clock: Callable[[], float] = time.time,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_deliver: int = DEFAULT_MAX_DELIVER,
        store: Store | None = None,
    ) -> None:
        """``steps`` maps step name -> workflow name -> definition; ``limits`` the per-step
        ``concurrency``; ``concurrency`` caps the steps that set none. ``ack_wait`` is the work
        queue's: a running handler's command is reported in progress every third of it, so only
        a dead worker's commands are delivered again. ``max_deliver``: deliveries of one attempt
        before the step fails for good with ``StepDeliveryError``. ``store``: where the
        transactions are (read only), to drop a command delivered again whose attempt was
        answered meanwhile (without one, every delivery runs)."""
        if max_deliver < 1:
            raise ValueError(f"max_deliver must be at least 1, not {max_deliver}")
        self.transport = transport
        self.system = system
        self.subjects = subjects
        self.container = container
        self.clock = clock
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.store = store
        self.working: set[WorkMsg] = set()
        """The deliveries whose handlers run now."""
        self.reply: Callable[[TxEvent], None] | None = None
        """Where the answers to commands handed over in process go (see :meth:`take`)."""
        self.executors: dict[str, StepExecutor] = {}
        self.consumers: list[Consumer] = []
        limits = limits or {}
        for name, by_workflow in steps.items():
            limit = limits.get(name) or concurrency
            self.executors[name] = StepExecutor(self, name, by_workflow, limit)

    async def start(self) -> None:
        """Start consuming the step subjects, and listen for aborts."""
        for name, executor in self.executors.items():
            subject = self.subjects.step(name)
            self.consumers.append(
                await self.transport.consume(
                    self.subjects.work_queue,
                    f"step-{subject.rsplit('.', 1)[1]}",
                    subject,
                    executor.deliver,
                    max_in_flight=executor.concurrency or DEFAULT_IN_FLIGHT,
                )
            )
        await self.transport.subscribe(f"{self.subjects.prefix}.ctl.*", self._on_control)
        self.system.start_soon(self._heartbeat, name="executor heartbeat")

    def take(self, cmd: StepCommand) -> bool:
        """Run ``cmd`` in process, if this host has its step (and a ``reply``): the local mode's
        shortcut past the work queue. ``False``: not here, send it through the queue."""
        executor = self.executors.get(cmd.step)
        if executor is None or self.reply is None:
            return False
        executor.take(cmd)
        return True

    async def hand_over(self, subject: str, data: bytes) -> bool:
        """Give a step's answer straight to the coordinator that asked (see
        ``StepCommand.direct``): whether it took it (applied and persisted). ``False`` (it is
        gone, busy past the deadline, or no longer owns the transaction): the caller puts the
        answer on the work queue; should both arrive, the second is a duplicate, ignored."""
        try:
            reply = await self.transport.request(subject, data, timeout=DIRECT_TIMEOUT)
        except TransportError:
            return False
        return reply.data == b"+"

    async def outstanding(self, cmd: StepCommand) -> bool:
        """Whether the transaction still waits for the answer to ``cmd``."""
        if self.store is None:
            return True
        state = await self.store.read(cmd.transaction_id)
        return state is not None and is_outstanding(state, cmd.step, cmd.action, cmd.attempt)

    async def _heartbeat(self) -> None:
        """Report every running command in progress, a few times per ``ack_wait``."""
        while True:
            await anyio.sleep(self.ack_wait / 3)
            for work in list(self.working):
                try:
                    await work.in_progress()
                except Exception as exc:  # disconnected: the redelivery is then the remedy
                    log.warning("in-progress report failed", subject=work.subject, error=str(exc))
                    break

    async def stop(self) -> None:
        """Take no more commands (before the running ones are cancelled and handed back, so they
        go to other workers rather than back to this one)."""
        consumers, self.consumers = self.consumers, []
        for consumer in consumers:
            await consumer.stop()

    def _on_control(self, msg: Msg) -> None:
        try:
            cmd = decode_message(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if isinstance(cmd, AbortStep):
            executor = self.executors.get(cmd.step)
            if executor is not None:
                executor.abort(cmd)
