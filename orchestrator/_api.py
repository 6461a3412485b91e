"""What every engine does the same way, over the public API of the coordinators.

:class:`LocalEngine` and the client of :func:`connect` share it: acting on a transaction
(``cancel``, ``set_step_success``, ``set_step_failure``, ``retry_step``) is a request on
``<prefix>.api.<verb>``; ``events`` and ``hooks`` subscribe to the public subjects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec

from actors import Mailbox, Subjects
from actors.protocol import MSGPACK, ApiReply, StepRequest
from transport import Msg, Transport

from ._errors import (
    ConfigurationError,
    OrchestratorError,
    StepNotAwaitingError,
    TransactionNotFoundError,
    UnknownWorkflowError,
)
from ._types import LifecycleEvent, WorkflowResult

__all__ = ["EngineAPI", "TransactionHandle", "raise_for"]

_event_decoder = msgspec.json.Decoder(LifecycleEvent)
_reply_decoder = msgspec.msgpack.Decoder(ApiReply)
_ERRORS: dict[str, type[OrchestratorError]] = {
    "TransactionNotFoundError": TransactionNotFoundError,
    "StepNotAwaitingError": StepNotAwaitingError,
    "UnknownWorkflowError": UnknownWorkflowError,
    "ProtocolError": ConfigurationError,
}


def _protocol_error(message: str) -> type[OrchestratorError]:
    return UnknownWorkflowError if message.startswith("unknown workflow") else ConfigurationError


def raise_for(reply: ApiReply) -> None:
    """Raise the error an API reply carries, as the exception named for its condition."""
    if reply.ok:
        return
    message = reply.error or "the request failed"
    if reply.error_type == "ProtocolError":
        raise _protocol_error(message)(message)
    raise _ERRORS.get(reply.error_type or "", OrchestratorError)(message)


class EngineAPI:
    """The engine API parts that go through the coordinators' public API."""

    transport: Transport
    subjects: Subjects
    request_timeout: float = 30.0

    async def wait(self, transaction_id: str, *, timeout: float | None = None) -> WorkflowResult:
        raise NotImplementedError

    async def get(self, transaction_id: str) -> WorkflowResult:
        raise NotImplementedError

    async def _settled(self, transaction_id: str, timeout: float | None) -> WorkflowResult:
        """The result once the transaction is finished or only waits on async steps."""
        raise NotImplementedError

    def _workflow_name(self, workflow: Any) -> str:
        return str(getattr(workflow, "name", workflow))

    async def _call(
        self, verb: str, request: msgspec.Struct, *, extra_time: float = 0.0
    ) -> ApiReply:
        """The answer to an API request (``extra_time``: how long it may wait on purpose)."""
        reply: Msg = await self.transport.request(
            self.subjects.api(verb),
            msgspec.msgpack.encode(request),
            headers={"Content-Type": MSGPACK},
            timeout=self.request_timeout + extra_time,
        )
        answer = _reply_decoder.decode(reply.data)
        raise_for(answer)
        return answer

    async def cancel(self, transaction_id: str, *, timeout: float | None = None) -> WorkflowResult:
        """Compensate a running or finished (retained) transaction; its final result."""
        await self._call("cancel", StepRequest(transaction_id=transaction_id))
        return await self.wait(transaction_id, timeout=timeout)

    async def set_step_success(
        self, key: str, response: Any = None, *, timeout: float | None = None
    ) -> WorkflowResult:
        """Complete an async step (or async compensation) that awaits a response.

        ``key`` is the step's idempotency key, ``"<workflow>:<transaction>:<step>:<action>"``.
        Returns once the transaction is finished or only waits on async steps again.
        """
        _check_key(key)
        try:
            request = StepRequest(idempotency_key=key, response=response)
            answer = await self._call("set_step_success", request)
        except TypeError as exc:  # the response cannot be encoded
            raise ConfigurationError(
                f"the response for {key!r} cannot be encoded ({type(response).__name__}): {exc}"
            ) from None
        assert answer.transaction_id is not None
        return await self._settled(answer.transaction_id, timeout)

    async def set_step_failure(
        self,
        key: str,
        error: Any = None,
        *,
        force_permanent: bool = False,
        timeout: float | None = None,
    ) -> WorkflowResult:
        """Fail an async step that awaits a response (retried unless ``force_permanent``)."""
        _check_key(key)
        if isinstance(error, BaseException):
            kind, message = type(error).__name__, str(error)
        else:
            kind, message = "StepFailure", str(error or "step failed")
        request = StepRequest(
            idempotency_key=key, error=message, error_type=kind, force_permanent=force_permanent
        )
        answer = await self._call("set_step_failure", request)
        assert answer.transaction_id is not None
        return await self._settled(answer.transaction_id, timeout)

    async def retry_step(self, key: str, *, timeout: float | None = None) -> WorkflowResult:
        """Invoke again an async step that awaits a response."""
        _check_key(key)
        answer = await self._call("retry_step", StepRequest(idempotency_key=key))
        assert answer.transaction_id is not None
        return await self._settled(answer.transaction_id, timeout)

    async def events(
        self, workflow: Any = None, transaction_id: str | None = None
    ) -> AsyncIterator[LifecycleEvent]:
        """Lifecycle events as they happen (an async iterator; stop by breaking out)."""
        name = None if workflow is None else self._workflow_name(workflow)
        async for msg in self._subscribe(self.subjects.event_pattern(name, transaction_id)):
            yield _event_decoder.decode(msg.data)

    async def hooks(self, workflow: Any, hook: str) -> AsyncIterator[Any]:
        """Payloads published by a hook, as they come."""
        subject = self.subjects.hook(self._workflow_name(workflow), hook)
        async for msg in self._subscribe(subject):
            yield msgspec.json.decode(msg.data)

    async def _subscribe(self, subject: str) -> AsyncIterator[Msg]:
        box: Mailbox[Msg] = Mailbox()
        sub = await self.transport.subscribe(subject, box.send)
        try:
            while True:
                yield await box.get()
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise ConfigurationError(f"an idempotency key is a string, got {key!r}")


class TransactionHandle:
    """A started transaction: ``await handle.wait()`` for its final result."""

    def __init__(self, engine: EngineAPI, workflow: str, transaction_id: str) -> None:
        self.engine = engine
        self.workflow = workflow
        self.transaction_id = transaction_id

    async def wait(self, timeout: float | None = None) -> WorkflowResult:
        """Wait until the transaction is finished."""
        return await self.engine.wait(self.transaction_id, timeout=timeout)

    async def get(self) -> WorkflowResult:
        """Its current picture."""
        return await self.engine.get(self.transaction_id)

    def __repr__(self) -> str:
        return f"<TransactionHandle {self.workflow}:{self.transaction_id}>"
