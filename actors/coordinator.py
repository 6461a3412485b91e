"""Coordinator actors: one per transaction, hosted by a :class:`CoordinatorHost`.

A coordinator is a thin shell around the pure state machine: it receives a message, applies the
event, persists the new state, carries out the commands, and only then acks the message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from orchestrator._codec import decode
from orchestrator._errors import UnknownWorkflowError
from orchestrator._graph import Graph
from orchestrator._transaction import (
    FINAL_STATES,
    Abort,
    Begin,
    Cancel,
    CancelChild,
    ChildFinished,
    ChildSuspended,
    Command,
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
    apply_all,
    is_settled,
    new_state,
    to_result,
)
from orchestrator._types import LifecycleEvent, StepError
from transport import Consumer, Msg, QueueConfig, Subscription, Transport, TransportError, WorkMsg

from ._kvstore import StoreConflictError
from ._leases import LeaseLostError, PartitionLeases
from ._store import Store
from ._subjects import Subjects, token
from ._system import Actor, ActorSystem, Directive, Signal
from ._timers import Timers
from .messages import (
    AbortStep,
    StartWorkflow,
    StepCommand,
    TxEvent,
    TxReply,
    decode_message,
    encode_message,
)

if TYPE_CHECKING:
    from .executor import ExecutorHost

__all__ = ["CoordinatorActor", "CoordinatorHost", "DirectResult", "LocalStart", "Watcher"]

log = structlog.get_logger("orchestrator.coordinator")

MAX_RESTARTS = 3
"""Restarts in a row of a coordinator actor whose turns keep failing (for another reason than
the transport or the store being unavailable) before it stops for good."""

_PASSING = (TransportError, StoreConflictError, OSError)
"""Failures that say nothing about the transaction: the store or the network was unavailable,
or another owner wrote first. The actor restarts from the store as often as it takes."""

Watcher = Callable[[str, TxState], None]
"""Called with ``("finish" | "suspend", state)`` by the host, in process."""

_FINAL = FINAL_STATES
_RESULTS = (StepDone, StepFailed)
"""The events of most turns: a step's answer."""
_json = msgspec.json.Encoder().encode


class LocalStart(WorkMsg):
    """A start handed to a coordinator actor in process (an API start whose partition is
    ours), settled like a delivery: acked once the transaction's first turn is persisted (or
    the start found a duplicate); any other outcome means "not done here"."""

    __slots__ = (
        "_settled",
        "data",
        "duplicate",
        "fresh",
        "headers",
        "num_delivered",
        "outcome",
        "subject",
    )

    def __init__(self, *, fresh: bool = False) -> None:
        self.fresh = fresh
        """The transaction id was just generated (by the gateway): no transaction has it, so
        the actor need not look for one."""
        self.subject = ""
        self.data = b""
        self.headers = None
        self.num_delivered = 1
        self.duplicate = False
        """Set by the actor: the transaction existed already (the start attached to it)."""
        self.outcome: str | None = None
        self._settled = Signal()

    async def ack(self) -> None:
        self._settle("ack")

    async def nak(self, delay: float | None = None) -> None:
        self._settle("nak")

    async def in_progress(self) -> None:
        pass

    async def term(self) -> None:
        self._settle("term")

    def _settle(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._settled.set()

    async def wait(self, timeout: float) -> str | None:
        """How the actor settled it: ``"ack"``, ``"nak"`` or ``"term"``; ``None`` if it did
        not within ``timeout`` seconds."""
        await self._settled.wait_for(timeout)
        return self.outcome


class DirectResult(WorkMsg):
    """A step result a worker sent straight to this host (a core request on the partition's
    result subject), settled like a delivery: acked, the worker hears ``+`` and is done; any
    other outcome answers ``-``, and the worker puts the result on the work queue instead."""

    __slots__ = ("_reply", "_transport", "data", "headers", "num_delivered", "subject")

    def __init__(self, transport: Transport, msg: Msg, reply: str) -> None:
        self.subject = msg.subject
        self.data = msg.data
        self.headers = msg.headers
        self.num_delivered = 1
        self._transport = transport
        self._reply: str | None = reply

    async def ack(self) -> None:
        await self._answer(b"+")

    async def nak(self, delay: float | None = None) -> None:
        await self._answer(b"-")

    async def in_progress(self) -> None:
        pass

    async def term(self) -> None:
        await self._answer(b"-")

    async def _answer(self, data: bytes) -> None:
        reply, self._reply = self._reply, None
        if reply is not None:
            await self._transport.publish(reply, data)


class CoordinatorActor(Actor[tuple[Any, WorkMsg | None]]):
    """The coordinator of one transaction."""

    def __init__(self, host: CoordinatorHost, workflow: str, transaction_id: str) -> None:
        super().__init__(f"coordinator {transaction_id}")
        self.host = host
        self.workflow = workflow
        self.transaction_id = transaction_id
        self.event_subject = host.event_subject(workflow, transaction_id)
        self.partition = host.subjects.partition(transaction_id)
        self.subject = host.partition_subjects[self.partition]
        """Where this transaction's messages go (step results, among others)."""
        self.direct = host.result_subjects[self.partition]
        """Where this host takes the transaction's step results straight from the workers."""
        self.state: TxState | None = None
        self.graph: Graph | None = None
        self.loaded = False
        self.restarted = False
        self.settled = False
        self.failures = 0
        self.outages = 0

    # -- supervision
    async def on_failure(
        self, messages: list[tuple[Any, WorkMsg | None]], exc: Exception
    ) -> Directive:
        # Supervision: the turn's effects are lost with the in-memory state; the actor restarts
        # from the last persisted state and the messages come again (queued ones redelivered by
        # the transport, in-process ones re-told), a few times, then the actor stops for good.
        if isinstance(exc, LeaseLostError):
            # Fenced: another coordinator owns the partition now. Its messages go there at once.
            log.info("partition lost; transaction handed over", transaction=self.transaction_id)
            for _, work in messages:
                if work is not None:
                    with contextlib.suppress(Exception):
                        await work.nak()
            self.host._forget(self)
            return Directive.STOP
        if isinstance(exc, _PASSING):
            # Wait a little before the next try (the store or NATS may be down for a while),
            # longer each time in a row.
            self.outages += 1
            await anyio.sleep(min(2.0, 0.05 * 2**self.outages))
        else:
            self.failures += 1
        giving_up = self.failures > MAX_RESTARTS
        if isinstance(exc, StoreConflictError):
            # Its checkpoint was written elsewhere (another owner, or a start delivered again
            # after its first checkpoint): the restart reloads it.
            log.info("checkpoint written elsewhere; reloading", transaction=self.transaction_id)
        else:
            log.error(
                "coordinator failed",
                transaction=self.transaction_id,
                failures=self.failures,
                giving_up=giving_up,
                exc_info=exc,
            )
        for msg, work in messages:
            if work is not None:
                with contextlib.suppress(Exception):  # unsettled, it comes back after ack_wait
                    await (work.term() if giving_up else work.nak(delay=0.5))
            elif not giving_up:
                self.mailbox.send((msg, None))
        if giving_up:
            self.host._forget(self)
            return Directive.STOP
        return Directive.RESTART

    async def on_restart(self) -> None:
        self.loaded = False
        self.restarted = True
        self.state = None
        if not self.stopped:
            # The failed turn may have persisted its state and lost its commands (or its
            # finish's messages): let them out again.
            self.mailbox.send((self.host.resume_message(self.workflow, self.transaction_id), None))

    def idle(self) -> bool:
        # Passivate when the transaction only waits (async steps, timers) or is over: the state
        # is in the store, and the next message re-activates a fresh actor.
        state = self.state
        if state is None or state.status in _FINAL or self.settled:
            self.host._forget(self)
            return True
        return False

    # -- messages
    async def on_batch(self, batch: list[tuple[Any, WorkMsg | None]]) -> None:
        """Apply every queued message, persist once, carry out the commands, then ack."""
        host = self.host
        if not self.loaded:
            await self._load(batch)
        elif len(batch) == 1 and self.state is not None:
            msg, work = batch[0]
            if type(msg) is TxEvent and msg.reply is None and type(msg.event) in _RESULTS:
                await self._apply_result(msg.event, work)  # the common turn, without the rest
                return
        now = host.clock()
        initial = self.state
        interest = host.transport.has_interest(self.event_subject)
        commands: list[Command] = []
        replies: list[tuple[str, TxReply]] = []
        acks: list[WorkMsg] = []
        events: list[Event] = []
        later: list[Awaitable[None]] = []
        for msg, work in batch:
            event = self._event(msg, work, replies, acks, later)
            if event is None:
                continue
            events.append(event)
            if isinstance(msg, TxEvent) and msg.reply is not None:
                # Answered one by one: the caller needs to know whether its own event applied.
                graph = self.graph
                assert graph is not None
                assert self.state is not None
                for earlier in (events[:-1], [event]):
                    if earlier:
                        self.state, cmds = apply_all(
                            graph, self.state, earlier, now=now, events=interest
                        )
                        commands.extend(cmds)
                events.clear()
                rejected = [c.message for c in cmds if isinstance(c, Reject)]
                replies.append(
                    (
                        msg.reply,
                        TxReply(ok=False, error=rejected[0], error_type="StepNotAwaitingError")
                        if rejected
                        else TxReply(ok=True),
                    )
                )
        if events:
            graph = self.graph
            assert graph is not None
            assert self.state is not None
            self.state, cmds = apply_all(graph, self.state, events, now=now, events=interest)
            commands = commands + cmds if commands else cmds
        state = self.state
        if state is not None and state is not initial:
            await self._commit(initial, state, commands, batch)
        if later:
            for pending in later:
                await pending
        if replies:
            if state is not None:
                # Callers that wait for the outcome need to know where the transaction stands.
                status = state.status
                replies = [
                    (subject, msgspec.structs.replace(r, state=status, settled=self.settled))
                    if r.ok
                    else (subject, r)
                    for subject, r in replies
                ]
            for subject, reply in replies:
                await host.reply(subject, reply)
        for work in acks:
            await work.ack()
        if self.failures or self.outages:
            self.failures = self.outages = 0

    async def _load(self, batch: list[tuple[Any, WorkMsg | None]]) -> None:
        """Read the transaction's state on activation (and re-arm its timers)."""
        host = self.host
        msg, work = batch[0]
        if isinstance(work, LocalStart) and work.fresh and not self.restarted:
            self.state = None
        elif isinstance(msg, StartWorkflow) and not self.restarted:
            # Most likely a new transaction: the store may skip what the first checkpoint's
            # create-if-absent checks anyway (a conflict restarts the actor, which then loads
            # in full and finds the start a duplicate).
            self.state = await host.store.load_start(self.transaction_id)
        else:
            self.state = await host.store.load(self.transaction_id)
        self.loaded = True
        if self.state is not None:
            self.graph = host.graphs.get(self.state.workflow)
            if self.state.status not in _FINAL:
                host.rearm(self.state)

    async def _apply_result(self, event: Event, work: WorkMsg | None) -> None:
        """A turn of one step result (most turns): what ``on_batch`` does for it."""
        host = self.host
        initial = self.state
        graph = self.graph
        assert initial is not None
        assert graph is not None
        interest = host.transport.has_interest(self.event_subject)
        state, commands = apply_all(graph, initial, [event], now=host.clock(), events=interest)
        self.state = state
        if state is not initial:
            await self._commit(initial, state, commands, None)
        if work is not None:
            await work.ack()
        if self.failures or self.outages:
            self.failures = self.outages = 0

    async def _commit(
        self,
        initial: TxState | None,
        state: TxState,
        commands: list[Command],
        batch: list[tuple[Any, WorkMsg | None]] | None,
    ) -> None:
        """Persist ``state`` (the turn's outcome), then carry out its commands."""
        host = self.host
        graph = self.graph
        assert graph is not None
        finished = state.status in _FINAL
        retire = finished and any(isinstance(c, Finished) for c in commands)
        nested = state.parent is not None
        # Persist first, then let anything out: whoever hears an event finds the state that
        # produced it (a finished transaction is persisted by moving it to the retained set).
        if retire or (not finished and (initial is None or state.version != initial.version)):
            host.fence(self.partition)
            if retire and not nested:
                # The retained copy is the finish; its live checkpoint goes once the finish is
                # out (a crash in between leaves it behind, older, and the store drops it).
                await host.retire(state, forget=False)
            else:
                # A nested transaction keeps its final state as a checkpoint until it told its
                # parent: a crash in between leaves it to whoever takes the partition over, who
                # resumes it (and so answers the parent); a retired one would be forgotten.
                await host.store.save(state)
        await host.execute(
            state, commands, self.subject, self.direct if host.takes_results else None
        )
        if retire:
            if nested:
                await host.retire(state)
            else:
                await host.store.forget(state.transaction_id)
        if finished and not retire and batch is not None and _cancelled_by_parent(batch):
            await host.notify_parent(state, action="compensate")
        if graph.has_async:
            settled = not finished and is_settled(graph, state)
            was_settled = (
                initial is not None and initial.status not in _FINAL and is_settled(graph, initial)
            )
            if settled and not was_settled:
                host.notify("suspend", state)
                await host.announce(state, to_parent=True)  # parent, and `suspend` event
            self.settled = settled
        else:
            self.settled = False

    def _event(
        self,
        msg: Any,
        work: WorkMsg | None,
        replies: list[tuple[str, TxReply]],
        acks: list[WorkMsg],
        later: list[Awaitable[None]],
    ) -> Event | None:
        """The state-machine event a message carries (``None``: nothing to apply)."""
        host = self.host
        if isinstance(msg, StartWorkflow):
            if self.state is not None:  # a duplicate start: attach, never run twice
                if isinstance(work, LocalStart):
                    work.duplicate = True
                if work is not None:
                    acks.append(work)
                later.append(host.announce(self.state, to_parent=msg.parent is not None))
                return None
            graph = host.graphs.get(msg.workflow)
            if graph is None:
                later.append(host.reject_start(msg, work))
                return None
            if work is not None:
                acks.append(work)
            self.graph = graph
            self.state = new_state(graph, self.transaction_id)
            return Begin(now=0.0, input=msg.input, context=msg.context, parent=msg.parent)
        if work is not None:
            acks.append(work)
        event: Event = msg.event
        if self.state is None or self.graph is None:
            if msg.reply is not None:
                replies.append(
                    (
                        msg.reply,
                        TxReply(
                            ok=False,
                            error=f"transaction {self.transaction_id!r} not found",
                            error_type="TransactionNotFoundError",
                        ),
                    )
                )
            elif isinstance(event, Cancel) and event.parent_attempt:
                later.append(host.answer_missing_child(msg))
            return None
        if isinstance(event, Resume) and self.state.status in _FINAL:
            # Resumed after it finished (a restart, or a takeover of a checkpoint the finish
            # left): what the finish let out may not have gone; let it out again.
            later.append(host.refinish(self.state))
        return event


class CoordinatorHost:
    """Runs the coordinator actors of one process and carries out their commands."""

    def __init__(
        self,
        *,
        transport: Transport,
        store: Store,
        system: ActorSystem,
        graphs: Mapping[str, Graph],
        subjects: Subjects,
        retention: float = 86400.0,
        clock: Callable[[], float] = time.time,
        leases: PartitionLeases | None = None,
        queue: QueueConfig | None = None,
    ) -> None:
        """Without ``leases`` the host owns every partition (local mode, one coordinator); with
        them it consumes and runs only the partitions it holds a lease on, taking them over
        (:meth:`acquire`) and handing them back (:meth:`release`) as the leases come and go."""
        self.transport = transport
        self.store = store
        self.system = system
        self.graphs = dict(graphs)
        self.subjects = subjects
        self.retention = retention
        self.clock = clock
        self.leases = leases
        self.queue = queue or subjects.work_queue_config()
        self.actors: dict[str, CoordinatorActor] = {}
        self.watchers: dict[str, list[Watcher]] = {}
        self.timers = Timers(self._fire_timer, clock)
        self.consumers: dict[int, Consumer] = {}
        self.executors: ExecutorHost | None = None
        """Step executors in this process (local mode): step commands go straight to them."""
        self._step_subjects: dict[str, str] = {}
        self._event_prefixes: dict[str, str] = {}
        self.partition_subjects = [subjects.tx_partition(p) for p in range(subjects.partitions)]
        """The subject of each partition, by number."""
        self.result_subjects = [subjects.result(p) for p in range(subjects.partitions)]
        """The subject where this host takes a partition's step results, by number."""
        self._results: dict[int | None, Subscription] = {}
        """The result subscriptions, by partition (``None``: all of them, without leases)."""

    async def start(self) -> None:
        """Create the work queue (idempotent), arm the timer task and start consuming: every
        partition at once, or (with leases) each one as its lease is acquired."""
        transport = self.transport
        await transport.ensure_queue(self.queue)
        self.system.start_soon(self.timers.run, name="coordinator timers")
        if self.leases is None:
            await transport.consume(
                self.subjects.work_queue,
                "coordinator-tx",
                f"{self.subjects.prefix}.tx.*",
                self._on_work,
                max_in_flight=4096,
            )
            await self._take_results(None)

    # -- partitions (with leases)
    async def acquire(self, partition: int) -> None:
        """Take a partition over: resume its live transactions, then consume its messages.

        Resuming loads each transaction (which re-arms its timers) and sends again the commands
        of its attempts in flight: its last owner may have died between persisting a state and
        sending what it implied.
        """
        subjects = self.subjects
        live = await self.store.live(lambda tx: subjects.partition(tx) == partition)
        for state in live:
            self.route(self.resume_message(state.workflow, state.transaction_id), None)
        self.consumers[partition] = await self.transport.consume(
            subjects.work_queue,
            f"coordinator-tx-{partition}",
            subjects.tx_partition(partition),
            self._on_work,
            max_in_flight=max(64, 4096 // subjects.partitions),
        )
        await self._take_results(partition)
        log.info("partition acquired", partition=partition, resumed=len(live))

    async def release(self, partition: int) -> None:
        """Stop running a partition (its lease is lost or handed over): stop consuming it and
        drop its actors; their queued messages go back to the queue for the new owner."""
        results = self._results.pop(partition, None)
        if results is not None:
            with contextlib.suppress(Exception):
                await results.unsubscribe()
        consumer = self.consumers.pop(partition, None)
        if consumer is not None:
            with contextlib.suppress(Exception):  # disconnected: the server forgets us anyway
                await consumer.stop()
        for actor in [a for a in self.actors.values() if a.partition == partition]:
            actor.stop()
            self._forget(actor)
            for _, work in actor.mailbox.drain():
                if work is not None:
                    with contextlib.suppress(Exception):
                        await work.nak()
        log.info("partition released", partition=partition)

    def fence(self, partition: int) -> None:
        """Raise ``LeaseLostError`` unless this host may still write the partition's state."""
        leases = self.leases
        if leases is not None and not leases.writable(partition):
            raise LeaseLostError(f"partition {partition} is no longer leased to this coordinator")

    def resume_message(self, workflow: str, transaction_id: str) -> TxEvent:
        """The in-process message that makes a transaction's actor resume (see ``Resume``)."""
        return TxEvent(
            workflow=workflow, transaction_id=transaction_id, event=Resume(now=self.clock())
        )

    async def _take_results(self, partition: int | None) -> None:
        """Take the step results of ``partition`` (``None``: of every partition) straight from
        the workers, when they run elsewhere: a result then costs a request instead of a
        persisted message, its delivery and its ack."""
        subject = self.subjects.results if partition is None else self.result_subjects[partition]
        self._results[partition] = await self.transport.subscribe(
            subject, self._on_result, queue="coordinators"
        )

    @property
    def takes_results(self) -> bool:
        """Whether this host takes step results straight from workers (see :meth:`_on_result`):
        commands then say so; their answers go to the queue otherwise."""
        return bool(self._results)

    # -- routing
    def _on_result(self, msg: Msg) -> None:
        reply = msg.reply
        if reply is None:
            log.warning("step result without a reply subject dropped", subject=msg.subject)
            return
        work = DirectResult(self.transport, msg, reply)
        try:
            result = decode_message(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            result = None
        if not isinstance(result, TxEvent) or not isinstance(result.event, _RESULTS):
            # Not a step result: the work queue's path says what is wrong with it.
            self.system.start_soon(work.nak)
            return
        self.route(result, work)

    def _on_work(self, work: WorkMsg) -> None:
        try:
            msg = decode_message(work.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable message dropped", subject=work.subject, error=str(exc))
            self.system.start_soon(work.term)
            return
        if not isinstance(msg, StartWorkflow | TxEvent):
            log.warning("unexpected message dropped", subject=work.subject, type=type(msg).__name__)
            self.system.start_soon(work.term)
            return
        self.route(msg, work)

    def route(self, msg: StartWorkflow | TxEvent, work: WorkMsg | None) -> None:
        """Hand ``msg`` to its transaction's actor, activating one when needed."""
        tx = msg.transaction_id
        actor = self.actors.get(tx)
        if actor is None:
            actor = CoordinatorActor(self, msg.workflow, tx)
            leases = self.leases
            if leases is not None and not leases.writable(actor.partition):
                # Not ours (any more): a late timer, or a delivery of a partition just lost.
                if work is not None:
                    self.system.start_soon(work.nak)
                return
            self.actors[tx] = actor
            self.system.spawn(actor)
        actor.tell((msg, work))

    def route_start(self, msg: StartWorkflow, work: WorkMsg | None) -> None:
        """A start from the gateway: run it here if its partition is ours, else hand it to the
        partition's owner through the partition subject (and only then ack it)."""
        leases = self.leases
        if leases is None or leases.writable(self.subjects.partition(msg.transaction_id)):
            self.route(msg, work)
        else:
            self.system.dispatcher.submit(self._forward_start, msg, work)

    async def start_here(
        self, msg: StartWorkflow, *, timeout: float, fresh: bool = False
    ) -> bool | None:
        """Start ``msg`` in this process if its partition is ours: whether it was fresh (not
        a duplicate) once its first turn is persisted; ``None`` when it was not done here (not
        our partition, the turn failed, or no answer within ``timeout`` seconds), and the
        caller puts it on the work queue instead (a second start of one id only attaches).
        ``fresh``: see ``LocalStart``."""
        leases = self.leases
        if leases is not None and not leases.writable(self.subjects.partition(msg.transaction_id)):
            return None
        work = LocalStart(fresh=fresh)
        self.route(msg, work)
        if await work.wait(timeout) == "ack":
            return not work.duplicate
        return None

    async def _forward_start(self, msg: StartWorkflow, work: WorkMsg | None) -> None:
        await self.transport.enqueue(
            self.subjects.tx(msg.transaction_id),
            encode_message(msg),
            msg_id=f"{msg.transaction_id}:start",
        )
        if work is not None:
            await work.ack()

    def _forget(self, actor: CoordinatorActor) -> None:
        if self.actors.get(actor.transaction_id) is actor:
            del self.actors[actor.transaction_id]

    def event_subject(self, workflow: str, transaction_id: str) -> str:
        """``subjects.event(workflow, transaction_id)``, with the workflow's part kept."""
        head = self._event_prefixes.get(workflow)
        if head is None:
            head = self._event_prefixes[workflow] = self.subjects.event(workflow, "")
        return head + token(transaction_id)

    # -- local notifications (LocalEngine waits on these)
    def watch(self, transaction_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` on finish/suspend of the transaction; returns an unwatch function."""
        watchers = self.watchers.setdefault(transaction_id, [])
        watchers.append(watcher)

        def unwatch() -> None:
            current = self.watchers.get(transaction_id)
            if current is not None and watcher in current:
                current.remove(watcher)
                if not current:
                    del self.watchers[transaction_id]

        return unwatch

    def notify(self, kind: str, state: TxState) -> None:
        for watcher in list(self.watchers.get(state.transaction_id, ())):
            watcher(kind, state)

    # -- commands
    async def execute(
        self,
        state: TxState,
        commands: Iterable[Command],
        reply_subject: str,
        direct: str | None = None,
    ) -> None:
        """Carry out ``commands`` (a :class:`Reject` is answered by the caller); step results
        go to ``direct`` (this host, straight away) if given, else to ``reply_subject`` (the
        transaction's partition subject)."""
        transport = self.transport
        subjects = self.subjects
        tx = state.transaction_id
        wf = state.workflow
        graph = self.graphs[wf]
        step_subjects = self._step_subjects
        # Handlers get a cancel scope only when something may abort them: a workflow timeout,
        # or a parent whose own timeout cancels this nested transaction.
        abortable = graph.timeout is not None or state.parent is not None
        sends: list[tuple[str, bytes, str]] = []
        executors = self.executors
        for cmd in commands:
            if isinstance(cmd, Invoke):
                command = StepCommand(
                    workflow=wf,
                    transaction_id=tx,
                    step=cmd.step,
                    action=cmd.action,
                    attempt=cmd.attempt,
                    input=cmd.input,
                    context=state.context,
                    timeout=cmd.timeout,
                    async_=cmd.async_,
                    abortable=abortable,
                    reply_subject=reply_subject,
                    direct=direct,
                )
                if executors is not None and executors.take(command):
                    continue
                data = encode_message(command)
                subject = step_subjects.get(cmd.step)
                if subject is None:
                    subject = step_subjects[cmd.step] = subjects.step(cmd.step)
                sends.append((subject, data, f"{tx}:{cmd.step}:{cmd.action}:{cmd.attempt}"))
            elif isinstance(cmd, Emit):
                event = cmd.event
                if event.type == "finish":  # subscribers need not ask for the outcome
                    summary = to_result(state, graph)
                    event = msgspec.structs.replace(event, result=summary.result, summary=summary)
                await self.publish_event(event)
            elif isinstance(cmd, Finished):
                self.notify("finish", state)
                if state.parent is not None:
                    await self.notify_parent(state, action=_answered(state))
            elif isinstance(cmd, SetTimer):
                self.arm(tx, wf, cmd)
            elif isinstance(cmd, StartChild):
                # Straight to the child's partition: internal starts carry the parent link.
                await transport.enqueue(
                    subjects.tx(cmd.transaction_id),
                    encode_message(
                        StartWorkflow(
                            workflow=cmd.workflow,
                            transaction_id=cmd.transaction_id,
                            input=cmd.input,
                            context=state.context,
                            parent=_parent_link(state, cmd.step, cmd.attempt),
                        )
                    ),
                    msg_id=cmd.transaction_id,
                )
            elif isinstance(cmd, CancelChild):
                cancel = Cancel(
                    now=self.clock(),
                    parent_attempt=cmd.attempt,
                    abort=cmd.abort,
                    parent=_parent_link(state, cmd.step, cmd.attempt),
                )
                await self.send(
                    cmd.workflow,
                    cmd.transaction_id,
                    cancel,
                    f"{cmd.transaction_id}:cancel:{tx}:{cmd.attempt}",
                )
            elif isinstance(cmd, Abort):
                await transport.publish(
                    subjects.control(cmd.step),
                    encode_message(
                        AbortStep(
                            workflow=wf,
                            transaction_id=tx,
                            step=cmd.step,
                            action=cmd.action,
                            attempt=cmd.attempt,
                        )
                    ),
                )
            elif isinstance(cmd, PublishHook):
                await transport.publish(
                    subjects.hook(wf, cmd.hook),
                    _json(decode(cmd.payload)),
                    headers={"Content-Type": "application/json", "Orch-Transaction": tx},
                )
        if len(sends) == 1 or not transport.waits_for_io:
            for subject, data, msg_id in sends:
                await transport.enqueue(subject, data, msg_id=msg_id)
        elif sends:  # a parallel group: send the commands side by side, not one round trip each
            async with anyio.create_task_group() as tg:
                for subject, data, msg_id in sends:
                    tg.start_soon(partial(transport.enqueue, subject, data, msg_id=msg_id))

    async def send(self, workflow: str, transaction_id: str, event: Any, msg_id: str) -> None:
        """Put ``event`` on the partition subject of a (nested or parent) transaction."""
        await self.transport.enqueue(
            self.subjects.tx(transaction_id),
            encode_message(TxEvent(workflow=workflow, transaction_id=transaction_id, event=event)),
            msg_id=msg_id,
        )

    async def retire(self, state: TxState, *, forget: bool = True) -> None:
        """Move a finished transaction to the retained set, for its workflow's retention
        (``forget``: see ``Store.finish``)."""
        retention = self.graphs[state.workflow].retention
        retention = self.retention if retention is None else retention
        await self.store.finish(state, retention, forget=forget)

    async def notify_parent_suspended(self, state: TxState) -> None:
        """Tell the parent step that this nested transaction only waits now."""
        parent = state.parent
        assert parent is not None
        event = ChildSuspended(now=self.clock(), step=parent.step, attempt=parent.attempt)
        msg_id = f"{parent.transaction_id}:suspended:{parent.step}:{parent.attempt}:{state.version}"
        await self.send(parent.workflow, parent.transaction_id, event, msg_id)

    async def notify_parent(self, state: TxState, *, action: str) -> None:
        """Tell the parent step of a nested transaction how it ended."""
        parent = state.parent
        assert parent is not None
        attempt = state.parent_comp_attempt if action == "compensate" else parent.attempt
        error: StepError | None = state.errors[0] if state.errors else None
        event = ChildFinished(
            now=self.clock(),
            step=parent.step,
            attempt=attempt,
            action=action,
            state=state.status,
            result=state.result,
            error=error,
        )
        msg_id = f"{parent.transaction_id}:child:{parent.step}:{action}:{attempt}"
        await self.send(parent.workflow, parent.transaction_id, event, msg_id)

    async def answer_missing_child(self, msg: TxEvent) -> None:
        """A parent asked to compensate a nested transaction that is gone (its retention ran
        out): nothing can undo it any more, so the parent step's compensation fails, and says so."""
        log.warning("cancel of an unknown nested transaction", transaction=msg.transaction_id)
        cancel = msg.event
        assert isinstance(cancel, Cancel)
        parent = cancel.parent
        if parent is None:
            return
        event = ChildFinished(
            now=self.clock(),
            step=parent.step,
            attempt=cancel.parent_attempt,
            action="compensate",
            state="failed",
            error=StepError(
                step=parent.step,
                action="compensate",
                type="TransactionNotFoundError",
                message=f"nested transaction {msg.transaction_id!r} is gone (retention ran out?): "
                "it cannot be compensated",
            ),
        )
        msg_id = f"{parent.transaction_id}:child:{parent.step}:compensate:{cancel.parent_attempt}"
        await self.send(parent.workflow, parent.transaction_id, event, msg_id)

    async def reject_start(self, msg: StartWorkflow, work: WorkMsg | None) -> None:
        """A start for a workflow this host does not know: say so, never retry it."""
        error = UnknownWorkflowError(
            f"unknown workflow {msg.workflow!r}; this coordinator runs {sorted(self.graphs)}"
        )
        log.warning("start of an unknown workflow", workflow=msg.workflow)
        subject = self.subjects.event(msg.workflow, msg.transaction_id)
        event = LifecycleEvent(
            type="error",
            workflow=msg.workflow,
            transaction_id=msg.transaction_id,
            timestamp=self.clock(),
            error=StepError(step="", action="start", type=type(error).__name__, message=str(error)),
        )
        if self.transport.has_interest(subject):
            await self.publish_event(event)
        self._forget_tx(msg.transaction_id)
        if work is not None:
            await work.term()

    async def refinish(self, state: TxState) -> None:
        """Let out again what a finished transaction's finish did: its parent's answer and its
        finish event, and move it to the retained set (again: that is harmless)."""
        await self.announce(state, to_parent=True)
        await self.retire(state)

    async def announce(self, state: TxState, *, to_parent: bool = False) -> None:
        """Say on its event subject how a transaction ended (``finish``) or that it only waits
        (``suspend``): when it comes to wait, and again on a start of a transaction that exists,
        for whoever started it again and waits (a running one says so itself in time).

        ``to_parent``: tell the parent step too (a start from it, sent again after a takeover,
        may mean the first answer died with a coordinator; message ids make a repeat harmless).
        """
        graph = self.graphs.get(state.workflow)
        if state.status in _FINAL:
            kind = "finish"
        elif graph is not None and graph.has_async and is_settled(graph, state):
            kind = "suspend"
        else:
            return
        if to_parent and state.parent is not None:
            if kind == "suspend":
                await self.notify_parent_suspended(state)
            else:
                await self.notify_parent(state, action=_answered(state))
        subject = self.subjects.event(state.workflow, state.transaction_id)
        if not self.transport.has_interest(subject):
            return
        summary = to_result(state, graph)
        await self.publish_event(
            LifecycleEvent(
                type=kind,
                workflow=state.workflow,
                transaction_id=state.transaction_id,
                timestamp=self.clock(),
                state=state.status,
                result=summary.result if kind == "finish" else None,
                summary=summary,
            )
        )

    async def publish_event(self, event: LifecycleEvent) -> None:
        """Publish a lifecycle event (JSON, for any subscriber)."""
        await self.transport.publish(
            self.subjects.event(event.workflow, event.transaction_id),
            _json(event),
            headers={"Content-Type": "application/json"},
        )

    def _forget_tx(self, transaction_id: str) -> None:
        actor = self.actors.get(transaction_id)
        if actor is not None:
            actor.stop()
            self._forget(actor)

    async def reply(self, subject: str, reply: TxReply) -> None:
        await self.transport.publish(subject, encode_message(reply))

    # -- timers
    def arm(self, transaction_id: str, workflow: str, cmd: SetTimer) -> None:
        self.timers.arm(cmd.at, (workflow, transaction_id, cmd))

    def rearm(self, state: TxState) -> None:
        """Arm the timers a loaded transaction's deadlines imply (after a takeover)."""
        graph = self.graphs.get(state.workflow)
        if graph is None:
            return
        tx, wf = state.transaction_id, state.workflow
        if state.deadline is not None and state.status == "invoking":
            self.arm(tx, wf, SetTimer(at=state.deadline, kind="workflow_timeout"))
        for name, record in state.steps.items():
            if record.retry_at is not None:
                action = "invoke" if record.state == "invoking" else "compensate"
                attempt = record.attempt if action == "invoke" else record.comp_attempt
                self.arm(
                    tx,
                    wf,
                    SetTimer(
                        at=record.retry_at, kind="retry", step=name, action=action, attempt=attempt
                    ),
                )

    def _fire_timer(self, payload: Any) -> None:
        workflow, tx, cmd = payload
        event = TimerFired(
            now=cmd.at, kind=cmd.kind, step=cmd.step, action=cmd.action, attempt=cmd.attempt
        )
        self.route(TxEvent(workflow=workflow, transaction_id=tx, event=event), None)


def _cancelled_by_parent(batch: list[tuple[Any, WorkMsg | None]]) -> bool:
    """Whether a message of ``batch`` is a parent step's compensation of this transaction."""
    return any(
        isinstance(msg, TxEvent) and isinstance(msg.event, Cancel) and msg.event.parent_attempt
        for msg, _ in batch
    )


def _answered(state: TxState) -> str:
    """What a finished nested transaction answers: its parent step's compensation (it was
    cancelled by it) or its invoke."""
    return "compensate" if state.parent_comp_attempt else "invoke"


def _parent_link(state: TxState, step: str, attempt: int) -> ParentLink:
    return ParentLink(
        workflow=state.workflow, transaction_id=state.transaction_id, step=step, attempt=attempt
    )
