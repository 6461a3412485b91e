"""The client of coordinator services: the engine API over a transport (NATS in production)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import msgspec

from actors import Mailbox, Subjects, new_transaction_id
from actors.protocol import ApiReply, GetRequest, ListRequest, StartRequest
from transport import Msg, Transport, TransportError

from ._api import EngineAPI, TransactionHandle
from ._errors import (
    ConfigurationError,
    TransactionNotFoundError,
    UnknownWorkflowError,
    WorkflowFailedError,
)
from ._types import LifecycleEvent, TransactionState, WorkflowResult

__all__ = ["Client", "connect"]

_event_decoder = msgspec.json.Decoder(LifecycleEvent)


class _Kind(msgspec.Struct):
    type: str


_kind_decoder = msgspec.json.Decoder(_Kind)
_OUTCOMES = frozenset(("finish", "suspend", "error"))
"""The events a waiting ``run`` or ``wait`` acts on."""


class Client(EngineAPI):
    """The same methods as :class:`LocalEngine`, served by coordinators elsewhere.

    Workflows are named (a :class:`Workflow` object works too, for its name); the client needs
    no definitions.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        prefix: str = "orch",
        partitions: int = 16,
        request_timeout: float = 30.0,
        owns_transport: bool = True,
        recheck: float = 5.0,
    ) -> None:
        """``recheck``: seconds between two reads of a transaction's state while ``run`` or
        ``wait`` waits for the event that ends the wait (``finish``, or ``suspend``). Events are
        sent at most once (a NATS restart loses those in flight, a coordinator may die between
        persisting an outcome and announcing it): the read is the safety net."""
        self.transport = transport
        self.subjects = Subjects(prefix, partitions)
        self.request_timeout = request_timeout
        self.recheck = recheck
        self._owns_transport = owns_transport
        self._started: dict[str, str] = {}
        """Transactions started through this client and not seen finished: until their
        coordinator takes the start, `wait` treats "not found" as "not begun yet"."""

    async def __aenter__(self) -> Client:
        if self._owns_transport:
            await self.transport.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._owns_transport:
            await self.transport.__aexit__(*exc)

    # -- running
    async def run(
        self,
        workflow: Any,
        input: Any = None,
        *,
        transaction_id: str | None = None,
        context: Mapping[str, Any] | None = None,
        throw_on_error: bool = True,
        result_from: str | None = None,
        timeout: float | None = None,
    ) -> WorkflowResult:
        """Run a workflow and wait until it finishes, or only waits on async steps."""
        name = self._workflow_name(workflow)
        with anyio.fail_after(timeout):
            # One request, answered with the outcome when the start runs in the process of the
            # coordinator that took it and ends within `recheck` (most runs); the id is the
            # gateway's to name when we have none, which spares it a look for an earlier run.
            wait = self.recheck if timeout is None else min(self.recheck, timeout)
            answer = await self._request_start(name, transaction_id, input, context, wait)
            tx = answer.transaction_id
            assert tx is not None
            result = answer.result
            if result is None:
                # Still running, or elsewhere, or a start of an id that exists: its events
                # (watched from now on) or its state (asked first) tell how it ends.
                self._started[tx] = name
                async with self._watch(tx) as box:
                    result = await self._until(tx, box, None, settle=True, ask=True)
        if result_from is not None:
            result = await self._get(tx, result_from)
        if throw_on_error and result.state in (TransactionState.REVERTED, TransactionState.FAILED):
            raise WorkflowFailedError(result)
        return result

    async def start(
        self,
        workflow: Any,
        input: Any = None,
        *,
        transaction_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> TransactionHandle:
        """Start a workflow; returns a handle at once."""
        name = self._workflow_name(workflow)
        tx = transaction_id or new_transaction_id(name)
        await self._send_start(name, tx, input, context)
        return TransactionHandle(self, name, tx)

    async def _send_start(
        self, workflow: str, tx: str, input: Any, context: Mapping[str, Any] | None
    ) -> bool:
        """Start ``tx``; whether the start was fresh (not a duplicate of one moments ago)."""
        self._started[tx] = workflow
        try:
            answer = await self._request_start(workflow, tx, input, context)
        except BaseException:
            self._started.pop(tx, None)
            raise
        return not answer.duplicate

    async def _request_start(
        self,
        workflow: str,
        tx: str | None,
        input: Any,
        context: Mapping[str, Any] | None,
        wait: float | None = None,
    ) -> ApiReply:
        """The gateway's answer to a start (see ``StartRequest.wait``)."""
        # Through the API, not straight onto the start subject: the gateway checks the request
        # (workflow known, input encodable, size) and says what is wrong before anything runs.
        request = StartRequest(
            workflow=workflow,
            transaction_id=tx,
            input=input,
            context=dict(context or {}),
            wait=wait,
        )
        try:
            return await self._call("start", request, extra_time=wait or 0.0)
        except TypeError as exc:
            raise ConfigurationError(
                f"the input of workflow {workflow!r} cannot be encoded: {exc}"
            ) from None

    async def wait(self, transaction_id: str, *, timeout: float | None = None) -> WorkflowResult:
        """Wait until the transaction is finished; its result (never raises for a failure)."""
        async with self._watch(transaction_id) as box:
            return await self._until(transaction_id, box, timeout, settle=False)

    async def _settled(self, transaction_id: str, timeout: float | None) -> WorkflowResult:
        async with self._watch(transaction_id) as box:
            return await self._until(transaction_id, box, timeout, settle=True)

    async def _until(
        self,
        tx: str,
        box: Mailbox[LifecycleEvent],
        timeout: float | None,
        *,
        settle: bool,
        ask: bool = True,
    ) -> WorkflowResult:

        async def outcome() -> WorkflowResult | None:
            """The result if the transaction is over (or, with ``settle``, only waits)."""
            try:
                result, settled = await self._get_state(tx)
            except TransactionNotFoundError:
                if tx not in self._started:
                    raise
                return None  # started here, not begun yet
            if result.state.finished or (settle and settled):
                self._started.pop(tx, None)
                return result
            return None

        with anyio.fail_after(timeout):
            if ask and (result := await outcome()) is not None:
                return result
            while True:  # the outcome comes with the finish (or suspend) event
                with anyio.move_on_after(self.recheck) as quiet:
                    event = await box.get()
                if quiet.cancelled_caught:  # no outcome for a while: was its event lost?
                    try:
                        result = await outcome()
                    except TransportError:  # NATS or the coordinators are away: wait on
                        continue
                    if result is not None:
                        return result
                    continue
                if event.type == "finish" or (settle and event.type == "suspend"):
                    self._started.pop(tx, None)
                    if event.summary is not None:
                        return event.summary
                    return _from_event(event)
                if event.type == "error" and event.error is not None:
                    self._started.pop(tx, None)
                    if "unknown workflow" in event.error.message:
                        raise UnknownWorkflowError(event.error.message)
                    raise ConfigurationError(event.error.message)

    # -- reading
    async def get(self, transaction_id: str) -> WorkflowResult:
        """The current picture of a live or retained transaction."""
        try:
            return await self._get(transaction_id, None)
        except TransactionNotFoundError:
            workflow = self._started.get(transaction_id)
            if workflow is None:
                raise
            # Started here a moment ago; its coordinator has not taken the start yet.
            return WorkflowResult(
                workflow=workflow,
                transaction_id=transaction_id,
                state=TransactionState.NOT_STARTED,
            )

    async def _get(self, transaction_id: str, result_from: str | None) -> WorkflowResult:
        answer = await self._call(
            "get", GetRequest(transaction_id=transaction_id, result_from=result_from)
        )
        assert answer.result is not None
        return answer.result

    async def _get_state(self, transaction_id: str) -> tuple[WorkflowResult, bool]:
        answer = await self._call("get", GetRequest(transaction_id=transaction_id))
        assert answer.result is not None
        return answer.result, answer.settled

    async def list(
        self, workflow: Any = None, *, state: str | TransactionState | None = None
    ) -> list[WorkflowResult]:
        """Live and retained transactions, optionally of one workflow and/or in one state."""
        name = None if workflow is None else self._workflow_name(workflow)
        wanted = None if state is None else TransactionState(state).value
        answer = await self._call("list", ListRequest(workflow=name, state=wanted))
        return list(answer.results or [])

    # -- events
    def _watch(self, transaction_id: str) -> _Watch:
        return _Watch(self, transaction_id)


def _from_event(event: LifecycleEvent) -> WorkflowResult:
    """A result from a ``finish`` event, for a transaction that is no longer retained."""
    return WorkflowResult(
        workflow=event.workflow,
        transaction_id=event.transaction_id,
        state=TransactionState(event.state or "done"),
        result=event.result,
        finished_at=event.timestamp,
    )


class _Watch:
    """Events of one transaction, subscribed before anything that could produce them."""

    def __init__(self, client: Client, transaction_id: str) -> None:
        self.client = client
        self.subject = client.subjects.event_pattern(None, transaction_id)
        self.box: Mailbox[LifecycleEvent] = Mailbox()
        self.sub: Any = None

    def _on(self, msg: Msg) -> None:
        # Only the events that end a wait wake the waiter (a run of 3 steps sends 8 events);
        # the others are recognised by their type alone, without decoding the rest.
        try:
            if _kind_decoder.decode(msg.data).type in _OUTCOMES:
                self.box.send(_event_decoder.decode(msg.data))
        except msgspec.DecodeError:  # not an event of ours: ignore it
            pass

    async def __aenter__(self) -> Mailbox[LifecycleEvent]:
        self.sub = await self.client.transport.subscribe(self.subject, self._on)
        return self.box

    async def __aexit__(self, *exc: Any) -> None:
        with anyio.CancelScope(shield=True):
            await self.sub.unsubscribe()


def connect(
    servers: str | list[str] = "nats://127.0.0.1:4222",
    *,
    prefix: str = "orch",
    partitions: int = 16,
    request_timeout: float = 30.0,
    recheck: float = 5.0,
    **options: Any,
) -> Client:
    """A client of the services on NATS: ``async with connect(url) as client:``.

    ``options`` go to the NATS connection (``user``, ``password``, ``token``,
    ``user_credentials``, ``nkeys_seed``, ``tls``...).
    """
    from transport import NatsTransport

    return Client(
        NatsTransport(servers, **options),
        prefix=prefix,
        partitions=partitions,
        request_timeout=request_timeout,
        recheck=recheck,
    )
