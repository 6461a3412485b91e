"""``LocalEngine``: the coordinator and executor actors in one process, over memory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

from actors import (
    ActorSystem,
    CoordinatorHost,
    MemoryStore,
    Signal,
    StartWorkflow,
    Store,
    Subjects,
    new_transaction_id,
)
from transport import MemoryTransport, Transport

from ._api import EngineAPI, TransactionHandle
from ._codec import EMPTY_MAP, decode, encode_value
from ._composer import Workflow
from ._errors import (
    ConfigurationError,
    TransactionNotFoundError,
    UnknownWorkflowError,
    WorkflowFailedError,
)
from ._graph import Graph
from ._step import as_container
from ._transaction import (
    TxState,
    is_settled,
    to_result,
)
from ._types import LifecycleEvent, TransactionState, WorkflowResult
from .services import DEFAULT_RETENTION, Coordinator, Worker, collect_workflows

__all__ = ["LocalEngine", "TransactionHandle"]


async def _wait(event: Signal, timeout: float | None) -> None:
    if timeout is None:
        await event.wait()  # no cancel scope on the hot path
    else:
        with anyio.fail_after(timeout):
            await event.wait()


_event_decoder = msgspec.msgpack.Decoder(LifecycleEvent)


def _check_workflow(state: TxState, wf: Workflow) -> None:
    """An existing transaction id may only be run again as the workflow it belongs to."""
    if state.workflow != wf.name:
        raise ConfigurationError(
            f"transaction {state.transaction_id!r} belongs to workflow {state.workflow!r}, "
            f"not {wf.name!r}"
        )


class LocalEngine(EngineAPI):
    """Runs workflows in this process (local single-node mode): no server needed.

    ``async with LocalEngine(workflows=[...], container={...}) as engine:``
    """

    def __init__(
        self,
        workflows: Iterable[Workflow],
        container: Any = None,
        *,
        retention: float = DEFAULT_RETENTION,
        concurrency: int | None = None,
        prefix: str = "orch",
        partitions: int = 16,
        transport: Transport | None = None,
        store: Store | None = None,
    ) -> None:
        self.workflows = collect_workflows(workflows)
        self.graphs: dict[str, Graph] = {name: wf.graph for name, wf in self.workflows.items()}
        self.container = as_container(container)
        self.retention = retention
        self.concurrency = concurrency
        self.subjects = Subjects(prefix, partitions)
        self.transport: Transport = transport or MemoryTransport()
        self.store: Store = store or MemoryStore()
        self._stack: contextlib.AsyncExitStack | None = None
        self._coordinators: CoordinatorHost | None = None

    # -- lifecycle
    async def __aenter__(self) -> LocalEngine:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self.transport)
            # One actor system for both: a worker that finishes a coordinator's turn takes the
            # step it dispatched without a wake-up (see docs/architecture.md, Dispatcher).
            system = await stack.enter_async_context(ActorSystem())
            common: dict[str, Any] = {
                "transport": self.transport,
                "prefix": self.subjects.prefix,
                "partitions": self.subjects.partitions,
                "system": system,
            }
            coordinator = await stack.enter_async_context(
                Coordinator(
                    self.workflows.values(),
                    store=self.store,
                    retention=self.retention,
                    lease_ttl=None,  # one process, one coordinator: every partition is ours
                    **common,
                )
            )
            worker = await stack.enter_async_context(
                Worker(
                    self.workflows.values(),
                    container=self.container,
                    concurrency=self.concurrency,
                    store=self.store,
                    **common,
                )
            )
            assert coordinator.host is not None
            assert worker.host is not None
            # In one process the work queue buys nothing (its redelivery is for processes that
            # die, and here they die together): step commands go straight to the executors and
            # their answers straight to the coordinator actors (see docs/architecture.md).
            coordinator.host.executors = worker.host
            host = coordinator.host
            worker.host.reply = lambda event: host.route(event, None)
            self._coordinators = coordinator.host
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self._coordinators = None
        if stack is not None:
            await stack.__aexit__(*exc)

    @property
    def _host(self) -> CoordinatorHost:
        if self._coordinators is None:
            raise RuntimeError("the engine is not running: use `async with LocalEngine(...)`")
        return self._coordinators

    def _workflow(self, workflow: str | Workflow) -> Workflow:
        name = workflow.name if isinstance(workflow, Workflow) else workflow
        wf = self.workflows.get(name)
        if wf is None:
            raise UnknownWorkflowError(
                f"unknown workflow {name!r}; this engine runs {sorted(self.workflows)}"
            )
        return wf

    # -- running
    async def run(
        self,
        workflow: str | Workflow,
        input: Any = None,
        *,
        transaction_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        throw_on_error: bool = True,
        result_from: str | None = None,
        timeout: float | None = None,
    ) -> WorkflowResult:
        """Run a workflow and wait until it finishes, or only waits on async steps.

        An existing ``transaction_id`` attaches to that transaction (never a second run).
        """
        wf = self._workflow(workflow)
        if result_from is not None and result_from not in wf.graph.index:
            raise ConfigurationError(
                f"result_from: workflow {wf.name!r} has no step {result_from!r}"
            )
        if transaction_id is None:  # a fresh id: nothing to attach to
            state = await self._run(wf, new_transaction_id(wf.name), input, context, timeout)
        else:
            state = await self._attach_or_run(wf, transaction_id, input, context, timeout)
        return self._finish(state, throw_on_error, result_from)

    async def start(
        self,
        workflow: str | Workflow,
        input: Any = None,
        *,
        transaction_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> TransactionHandle:
        """Start a workflow and return its handle at once."""
        wf = self._workflow(workflow)
        tx = transaction_id or new_transaction_id(wf.name)
        existing = await self.store.read(tx)
        if existing is None:
            self._send_start(wf, tx, input, context)
        else:
            _check_workflow(existing, wf)
        return TransactionHandle(self, wf.name, tx)

    def _send_start(
        self, wf: Workflow, tx: str, input: Any, context: Mapping[str, Any] | None
    ) -> None:
        try:
            data = encode_value(input, "the input of workflow", wf.name)
            ctx = encode_value(dict(context), "the run context") if context else EMPTY_MAP
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from None
        msg = StartWorkflow(workflow=wf.name, transaction_id=tx, input=data, context=ctx)
        # The start goes straight to the coordinator's actor: in one process nothing is gained by
        # a round trip through the queue, and its dedupe is the actor's own "already started".
        self._host.route(msg, None)

    async def _attach_or_run(
        self,
        wf: Workflow,
        tx: str,
        input: Any,
        context: Mapping[str, Any] | None,
        timeout: float | None,
    ) -> TxState:
        """Attach to the transaction ``tx`` if it exists, else start it (see :meth:`_run`)."""
        state = await self.store.read(tx)
        if state is not None:
            _check_workflow(state, wf)
            return await self._await(tx, timeout, settle=True)
        return await self._run(wf, tx, input, context, timeout)

    async def _run(
        self,
        wf: Workflow,
        tx: str,
        input: Any,
        context: Mapping[str, Any] | None,
        timeout: float | None,
    ) -> TxState:
        """Start a transaction that does not exist yet; its state once it finishes or only
        waits (on async steps)."""
        done = Signal()
        box: list[TxState] = []

        def watcher(kind: str, st: TxState) -> None:
            box.append(st)
            done.set()

        unwatch = self._host.watch(tx, watcher)
        try:
            self._send_start(wf, tx, input, context)
            await _wait(done, timeout)
        finally:
            unwatch()
        return box[-1]

    async def _await(self, tx: str, timeout: float | None, *, settle: bool) -> TxState:
        host = self._host
        done = Signal()

        def watcher(kind: str, st: TxState) -> None:
            if kind == "finish" or settle:
                done.set()

        unwatch = host.watch(tx, watcher)
        try:
            with anyio.fail_after(timeout):
                while True:
                    state = await self.store.read(tx)
                    if state is None:
                        if tx not in host.actors:
                            raise TransactionNotFoundError(f"transaction {tx!r} not found")
                        # Started, not begun yet: wait for its coordinator's first turn.
                        await anyio.lowlevel.checkpoint()
                        continue
                    if TransactionState(state.status).finished:
                        return state
                    if settle and is_settled(self.graphs[state.workflow], state):
                        return state
                    await done.wait()
                    done = Signal()
        finally:
            unwatch()

    def _finish(
        self, state: TxState, throw_on_error: bool, result_from: str | None = None
    ) -> WorkflowResult:
        result = to_result(state, self.graphs.get(state.workflow))
        if result_from is not None:
            record = state.steps.get(result_from)
            value = decode(record.output) if record is not None and record.output else None
            result = msgspec.structs.replace(result, result=value)
        if throw_on_error and result.state in (TransactionState.REVERTED, TransactionState.FAILED):
            raise WorkflowFailedError(result)
        return result

    async def wait(self, transaction_id: str, *, timeout: float | None = None) -> WorkflowResult:
        """Wait until the transaction is finished; its result (never raises for a failure)."""
        state = await self._await(transaction_id, timeout, settle=False)
        return self._finish(state, throw_on_error=False)

    async def get(self, transaction_id: str) -> WorkflowResult:
        """The current picture of a live or retained transaction."""
        state = await self.store.read(transaction_id)
        if state is None:
            actor = self._host.actors.get(transaction_id)
            if actor is None:
                raise TransactionNotFoundError(f"transaction {transaction_id!r} not found")
            # Started a moment ago; its coordinator has not taken its first turn yet.
            return WorkflowResult(
                workflow=actor.workflow,
                transaction_id=transaction_id,
                state=TransactionState.NOT_STARTED,
            )
        return to_result(state, self.graphs.get(state.workflow))

    async def list(
        self, workflow: str | Workflow | None = None, *, state: str | TransactionState | None = None
    ) -> list[WorkflowResult]:
        """Live and retained transactions, optionally of one workflow and/or in one state."""
        name = None if workflow is None else self._workflow(workflow).name
        wanted = None if state is None else TransactionState(state).value
        return [
            to_result(s, self.graphs.get(s.workflow))
            for s in await self.store.list(name)
            if wanted is None or s.status == wanted
        ]

    async def _settled(self, transaction_id: str, timeout: float | None) -> WorkflowResult:
        state = await self._await(transaction_id, timeout, settle=True)
        return self._finish(state, throw_on_error=False)

    def _workflow_name(self, workflow: Any) -> str:
        return self._workflow(workflow).name

    async def hooks(self, workflow: str | Workflow, hook: str) -> AsyncIterator[Any]:
        """Payloads published by a hook, as they come."""
        wf = self._workflow(workflow)
        if hook not in {n.name for n in wf.graph.nodes if n.kind == "hook"}:
            raise ConfigurationError(f"workflow {wf.name!r} has no hook {hook!r}")
        async for payload in super().hooks(wf, hook):
            yield payload

    def __repr__(self) -> str:
        return f"<LocalEngine workflows={sorted(self.workflows)}>"
