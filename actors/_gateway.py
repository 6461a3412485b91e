"""The coordinator's public face: start messages and API requests from any NATS client.

Bad input (undecodable bytes, invalid JSON, a wrong schema, an unknown workflow, a payload over
the limit) gets an error reply or an ``error`` lifecycle event that says what was wrong; the
message is terminated, never redelivered, and the gateway goes on with the next one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import msgspec
import structlog

from orchestrator._codec import EMPTY_MAP, decode, encode_value
from orchestrator._graph import Graph
from orchestrator._transaction import (
    FINAL_STATES,
    Cancel,
    Complete,
    RetryStep,
    TxState,
    is_settled,
    to_result,
)
from orchestrator._types import LifecycleEvent, StepError, TransactionState
from transport import Msg, Transport, WorkMsg

from ._store import Store
from ._subjects import Subjects, untoken
from ._system import ActorSystem, Signal
from .messages import StartWorkflow, TxEvent, TxEventBody, TxReply, decode_message, encode_message
from .protocol import (
    MSGPACK,
    ApiReply,
    GetRequest,
    ListRequest,
    ProtocolError,
    StartRequest,
    StepRequest,
    content_type,
    decode_request,
    encode_reply,
)

__all__ = ["DEFAULT_MAX_PAYLOAD", "Gateway", "parse_key"]

log = structlog.get_logger("orchestrator.gateway")

DEFAULT_MAX_PAYLOAD = 1024 * 1024
"""Bytes a start or API request may carry (NATS's own default ``max_payload``)."""

_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count(1)


def new_transaction_id(workflow: str) -> str:
    """A fresh transaction id: the workflow name, 64 random bits per process and a counter."""
    return f"{workflow}-{_ID_PREFIX}{next(_ids):x}"


def parse_key(graphs: Mapping[str, Graph], key: str) -> list[tuple[str, str, str, str]]:
    """Candidate ``(workflow, transaction, step, action)`` for an idempotency key.

    The key is ``<workflow>:<transaction>:<step>:<action>``; names may contain ``:``, so it is
    matched against the known workflow and step names rather than split.
    """
    out = []
    for name, graph in graphs.items():
        if not key.startswith(name + ":"):
            continue
        for node in graph.nodes:
            for action in ("invoke", "compensate"):
                suffix = f":{node.name}:{action}"
                if key.endswith(suffix) and len(key) > len(name) + 1 + len(suffix):
                    out.append((name, key[len(name) + 1 : -len(suffix)], node.name, action))
    return out


class Gateway:
    """Takes start messages from the work queue and answers ``<prefix>.api.<verb>`` requests."""

    def __init__(
        self,
        *,
        transport: Transport,
        system: ActorSystem,
        store: Store,
        graphs: Mapping[str, Graph],
        subjects: Subjects,
        route: Callable[[StartWorkflow, WorkMsg | None], None],
        start_here: Callable[..., Awaitable[bool | None]] | None = None,
        watch: Callable[[str, Callable[[str, TxState], None]], Callable[[], None]] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        clock: Callable[[], float],
    ) -> None:
        """``route`` takes the starts of the work queue; ``start_here``, when given, runs an API
        start in this process if it can (see ``CoordinatorHost.start_here``: called with the
        start and ``fresh``, whether the gateway named the transaction), and ``watch`` (see
        ``CoordinatorHost.watch``) lets a start that ran here answer with its outcome (see
        ``StartRequest.wait``); the first spares the
        start its trip through the queue."""
        self.transport = transport
        self.system = system
        self.store = store
        self.graphs = dict(graphs)
        self.subjects = subjects
        self.route = route
        self.start_here = start_here
        self.watch = watch
        self.max_payload = max_payload
        self.clock = clock
        self._replies: dict[str, Signal] = {}
        self._answers: dict[str, TxReply] = {}
        self._reply_prefix = f"{subjects.prefix}.reply.{os.urandom(6).hex()}"
        self._reply_ids = itertools.count(1)

    async def start(self) -> None:
        """Consume start messages and serve the API."""
        p = self.subjects.prefix
        await self.transport.consume(
            self.subjects.work_queue,
            "gateway-start",
            f"{p}.start.*",
            self._on_start,
            max_in_flight=1024,
        )
        await self.transport.subscribe(f"{p}.api.*", self._on_api, queue="orch-gateway")
        await self.transport.subscribe(f"{self._reply_prefix}.*", self._on_reply)

    # -- start messages (any client, JSON or msgpack)
    def _on_start(self, work: WorkMsg) -> None:
        workflow = untoken(work.subject.rsplit(".", 1)[-1])
        try:
            msg = self.start_message(work.data, work.headers, workflow)
        except ProtocolError as exc:
            self.system.dispatcher.submit(self._reject, work, workflow, str(exc))
            return
        self.route(msg, work)

    def start_message(
        self, data: bytes, headers: Mapping[str, str] | None, workflow: str | None
    ) -> StartWorkflow:
        """Check a start request and turn it into the internal start message."""
        return self._start(data, headers, workflow)[0]

    def _start(
        self, data: bytes, headers: Mapping[str, str] | None, workflow: str | None
    ) -> tuple[StartWorkflow, StartRequest]:
        """:meth:`start_message`, and the request it came from."""
        if len(data) > self.max_payload:
            raise ProtocolError(
                f"the start request has {len(data)} bytes; the limit is {self.max_payload}"
            )
        encoding = content_type(headers, data)
        request = decode_request(data, StartRequest, encoding)
        name = workflow or request.workflow
        if request.workflow is not None and workflow is not None and request.workflow != workflow:
            raise ProtocolError(
                f"the subject names workflow {workflow!r} but the request {request.workflow!r}"
            )
        if not name:
            raise ProtocolError("the start request names no workflow")
        if name not in self.graphs:
            raise ProtocolError(
                f"unknown workflow {name!r}; this deployment runs {sorted(self.graphs)}"
            )
        tx = request.transaction_id or new_transaction_id(name)
        try:
            data_in = encode_value(request.input, "the workflow input")
            context = encode_value(request.context, "the context") if request.context else None
        except TypeError as exc:
            raise ProtocolError(str(exc)) from None
        if request.wait is not None and not request.wait >= 0:
            raise ProtocolError(f"wait must be a number of seconds >= 0, not {request.wait!r}")
        start = StartWorkflow(
            workflow=name, transaction_id=tx, input=data_in, context=context or EMPTY_MAP
        )
        return start, request

    async def _reject(self, work: WorkMsg, workflow: str, message: str) -> None:
        log.warning("bad start request", subject=work.subject, error=message)
        tx = _transaction_id_of(work.data)
        event = LifecycleEvent(
            type="error",
            workflow=workflow,
            transaction_id=tx,
            timestamp=self.clock(),
            error=StepError(step="", action="start", type="ProtocolError", message=message),
        )
        await self.transport.publish(
            self.subjects.event(workflow, tx or "_"),
            msgspec.json.encode(event),
            headers={"Content-Type": "application/json"},
        )
        await work.term()

    # -- API requests
    def _on_api(self, msg: Msg) -> None:
        self.system.dispatcher.submit(self._api, msg)

    async def _api(self, msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        encoding = content_type(msg.headers, msg.data) if msg.data else MSGPACK
        try:
            if len(msg.data) > self.max_payload:
                raise ProtocolError(
                    f"the request has {len(msg.data)} bytes; the limit is {self.max_payload}"
                )
            reply = await self.answer(verb, msg)
        except ProtocolError as exc:
            reply = ApiReply(ok=False, error=str(exc), error_type="ProtocolError")
        except Exception as exc:  # a bug must not stop the gateway: say so, log it
            log.exception("API request failed", verb=verb)
            reply = ApiReply(ok=False, error=str(exc), error_type=type(exc).__name__)
        if msg.reply:
            await self.transport.publish(
                msg.reply,
                encode_reply(reply, encoding),
                headers={"Content-Type": encoding},
            )

    async def answer(self, verb: str, msg: Msg) -> ApiReply:
        encoding = content_type(msg.headers, msg.data)
        if verb == "start":
            start, request = self._start(msg.data, msg.headers, None)
            if self.start_here is not None:
                reply = await self._start_here(start, request)
                if reply is not None:  # its first turn is persisted: as durable as the queue
                    return reply
            # Onto the durable start subject, as any client could have put it, with the id fixed.
            request = StartRequest(
                workflow=start.workflow,
                transaction_id=start.transaction_id,
                input=msgspec.msgpack.decode(start.input),
                context=msgspec.msgpack.decode(start.context),
            )
            stored = await self.transport.enqueue(
                self.subjects.start(start.workflow),
                msgspec.msgpack.encode(request),
                headers={"Content-Type": MSGPACK},
                msg_id=start.transaction_id,
            )
            return ApiReply(ok=True, transaction_id=start.transaction_id, duplicate=not stored)
        if verb == "get":
            get = decode_request(msg.data, GetRequest, encoding)
            state = await self.store.read(get.transaction_id)
            if state is None:
                return _not_found(get.transaction_id)
            result = self.result(state)
            if get.result_from is not None:
                record = state.steps.get(get.result_from)
                if record is None:
                    raise ProtocolError(
                        f"result_from: workflow {state.workflow!r} has no step {get.result_from!r}"
                    )
                value = decode(record.output) if record.output is not None else None
                result = msgspec.structs.replace(result, result=value)
            graph = self.graphs.get(state.workflow)
            settled = graph is not None and graph.has_async and is_settled(graph, state)
            return ApiReply(
                ok=True,
                transaction_id=state.transaction_id,
                state=state.status,
                settled=settled,
                result=result,
            )
        if verb == "list":
            query = decode_request(msg.data, ListRequest, encoding)
            if query.workflow is not None and query.workflow not in self.graphs:
                raise ProtocolError(f"unknown workflow {query.workflow!r}")
            if query.state is not None and query.state not in TransactionState._value2member_map_:
                raise ProtocolError(f"unknown state {query.state!r}")
            states = await self.store.list(query.workflow)
            return ApiReply(
                ok=True,
                results=[self.result(s) for s in states if query.state in (None, s.status)],
            )
        if verb in ("cancel", "set_step_success", "set_step_failure", "retry_step"):
            return await self.act(verb, decode_request(msg.data, StepRequest, encoding))
        raise ProtocolError(
            f"unknown API verb {verb!r}; verbs: start, get, list, cancel, set_step_success, "
            "set_step_failure, retry_step"
        )

    async def _start_here(self, start: StartWorkflow, request: StartRequest) -> ApiReply | None:
        """Start in this process (``None``: not done here), and with ``request.wait``, answer
        with the outcome if it comes in time."""
        assert self.start_here is not None
        tx = start.transaction_id
        outcome: list[TxState] = []
        came = Signal()
        unwatch = None
        if request.wait and self.watch is not None:  # before the start: it may end at once

            def watcher(kind: str, state: TxState) -> None:
                outcome.append(state)
                came.set()

            unwatch = self.watch(tx, watcher)
        try:
            fresh = await self.start_here(start, fresh=request.transaction_id is None)
            if fresh is None:
                return None
            if not fresh or unwatch is None:  # a duplicate, or nobody waits
                return ApiReply(ok=True, transaction_id=tx, duplicate=not fresh)
            await came.wait_for(request.wait or 0)
        finally:
            if unwatch is not None:
                unwatch()
        if not outcome:
            return ApiReply(ok=True, transaction_id=tx)
        state = outcome[-1]
        return ApiReply(
            ok=True,
            transaction_id=tx,
            state=state.status,
            settled=state.status not in FINAL_STATES,
            result=self.result(state),
        )

    def result(self, state: TxState) -> Any:
        return to_result(state, self.graphs.get(state.workflow))

    async def act(self, verb: str, request: StepRequest) -> ApiReply:
        """Forward an event to the transaction's coordinator and wait for its answer."""
        now = self.clock()
        body: TxEventBody
        if verb == "cancel":
            if not request.transaction_id:
                raise ProtocolError("cancel needs a transaction_id")
            state = await self.store.read(request.transaction_id)
            if state is None:
                return _not_found(request.transaction_id)
            body = Cancel(now=now)
        else:
            if not request.idempotency_key:
                raise ProtocolError(f"{verb} needs an idempotency_key")
            found = await self.find_key(request.idempotency_key)
            if found is None:
                return ApiReply(
                    ok=False,
                    error=f"unknown idempotency key {request.idempotency_key!r}: no live "
                    "transaction has that step (expected "
                    "'<workflow>:<transaction>:<step>:<invoke|compensate>')",
                    error_type="TransactionNotFoundError",
                )
            state, step, action = found
            if verb == "retry_step":
                body = RetryStep(now=now, step=step)
            elif verb == "set_step_success":
                try:
                    output = encode_value(request.response, f"the response for step {step!r}")
                except TypeError as exc:
                    raise ProtocolError(str(exc)) from None
                body = Complete(now=now, step=step, action=action, ok=True, output=output)
            else:
                error = StepError(
                    step=step,
                    action=action,
                    type=request.error_type or "StepFailure",
                    message=request.error or "step failed",
                )
                body = Complete(
                    now=now,
                    step=step,
                    action=action,
                    ok=False,
                    error=error,
                    force_permanent=request.force_permanent,
                )
        answer = await self.forward(state, body)
        if not answer.ok:
            return ApiReply(ok=False, error=answer.error, error_type=answer.error_type)
        return ApiReply(
            ok=True,
            transaction_id=state.transaction_id,
            state=answer.state,
            settled=answer.settled,
        )

    async def find_key(self, key: str) -> tuple[TxState, str, str] | None:
        for workflow, tx, step, action in parse_key(self.graphs, key):
            state = await self.store.read(tx)
            if state is not None and state.workflow == workflow:
                return state, step, action
        return None

    async def forward(self, state: TxState, body: TxEventBody, timeout: float = 30.0) -> TxReply:
        token = str(next(self._reply_ids))
        reply_subject = f"{self._reply_prefix}.{token}"
        signal = self._replies[token] = Signal()
        try:
            await self.transport.enqueue(
                self.subjects.tx(state.transaction_id),
                encode_message(
                    TxEvent(
                        workflow=state.workflow,
                        transaction_id=state.transaction_id,
                        event=body,
                        reply=reply_subject,
                    )
                ),
            )
            with anyio.fail_after(timeout):
                await signal.wait()
            return self._answers.pop(token)
        finally:
            self._replies.pop(token, None)
            self._answers.pop(token, None)

    def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        signal = self._replies.get(token)
        if signal is None:
            return
        try:
            answer = decode_message(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if isinstance(answer, TxReply):
            self._answers[token] = answer
            signal.set()


def _transaction_id_of(data: bytes) -> str:
    """The transaction id a (maybe broken) start request names, if it can be read."""
    for decode_any in (msgspec.json.decode, msgspec.msgpack.decode):
        try:
            raw = decode_any(data)
        except (msgspec.DecodeError, ValueError, TypeError):
            continue
        if isinstance(raw, dict) and isinstance(raw.get("transaction_id"), str):
            return str(raw["transaction_id"])
    return ""


def _not_found(transaction_id: str) -> ApiReply:
    return ApiReply(
        ok=False,
        error=f"transaction {transaction_id!r} not found",
        error_type="TransactionNotFoundError",
    )
