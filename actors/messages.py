"""The wire messages: one tagged union, msgpack-encoded, decoded by one reused decoder."""

from __future__ import annotations

import msgspec

from orchestrator._codec import EMPTY_MAP
from orchestrator._transaction import (
    Begin,
    Cancel,
    ChildFinished,
    ChildSuspended,
    Complete,
    ParentLink,
    Resume,
    RetryStep,
    StepDone,
    StepFailed,
    TimerFired,
)

__all__ = [
    "AbortStep",
    "Message",
    "StartWorkflow",
    "StepCommand",
    "TxEvent",
    "TxEventBody",
    "TxReply",
    "decode_message",
    "encode_message",
]

TxEventBody = (
    Begin
    | StepDone
    | StepFailed
    | Complete
    | TimerFired
    | Cancel
    | ChildFinished
    | ChildSuspended
    | RetryStep
    | Resume
)


class StartWorkflow(
    msgspec.Struct, frozen=True, kw_only=True, tag="start", forbid_unknown_fields=True
):
    """Start (or attach to) a transaction of ``workflow``."""

    workflow: str
    transaction_id: str
    input: bytes
    context: bytes = EMPTY_MAP
    parent: ParentLink | None = None


class TxEvent(msgspec.Struct, frozen=True, kw_only=True, tag="tx", forbid_unknown_fields=True):
    """An event for one transaction; ``reply``: where to say whether it applied."""

    workflow: str
    transaction_id: str
    event: TxEventBody
    reply: str | None = None


class StepCommand(
    msgspec.Struct, frozen=True, kw_only=True, tag="step", forbid_unknown_fields=True
):
    """Run ``action`` of ``step`` for a transaction; the answer goes to ``reply_subject``."""

    workflow: str
    transaction_id: str
    step: str
    action: str
    attempt: int
    input: bytes
    context: bytes = EMPTY_MAP
    timeout: float | None = None
    async_: bool = False
    abortable: bool = False
    """The workflow has a timeout: the handler may be cancelled by an :class:`AbortStep`."""
    reply_subject: str
    direct: str | None = None
    """A core subject where the coordinator that sent the command takes the answer straight
    away: a request, answered ``+`` once the answer is applied and persisted. Without it, or
    when the request gets anything else, the answer goes to ``reply_subject`` (the queue)."""


class AbortStep(msgspec.Struct, frozen=True, kw_only=True, tag="abort", forbid_unknown_fields=True):
    """Cancel a running handler (a workflow timeout)."""

    workflow: str
    transaction_id: str
    step: str
    action: str
    attempt: int


class TxReply(msgspec.Struct, frozen=True, kw_only=True, tag="reply", forbid_unknown_fields=True):
    """The answer to a request about a transaction."""

    ok: bool
    error: str | None = None
    error_type: str | None = None
    state: str | None = None
    """The transaction's state once the request applied."""
    settled: bool = False
    """It only waits on async steps once the request applied."""


Message = StartWorkflow | TxEvent | StepCommand | AbortStep | TxReply

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)

encode_message = _encoder.encode


def decode_message(data: bytes) -> Message:
    """Decode one wire message (``msgspec.DecodeError`` / ``ValidationError`` if malformed)."""
    return _decoder.decode(data)
