"""The public protocol: what any NATS client (any language) sends and receives.

Requests on ``<prefix>.start.<workflow>`` and ``<prefix>.api.<verb>`` are JSON when the message
says ``Content-Type: application/json`` (or, without the header, when it starts with ``{``),
msgpack otherwise; replies use the request's encoding. Lifecycle events and hook payloads are
published as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from orchestrator._types import WorkflowResult

__all__ = [
    "JSON",
    "MSGPACK",
    "ApiReply",
    "GetRequest",
    "ListRequest",
    "ProtocolError",
    "StartRequest",
    "StepRequest",
    "content_type",
    "decode_request",
    "encode_reply",
]

JSON = "application/json"
MSGPACK = "application/msgpack"

T = TypeVar("T")


class ProtocolError(ValueError):
    """A request that cannot be understood; the message says what is wrong."""


class StartRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Start a workflow (on ``start.<workflow>`` the workflow comes from the subject)."""

    workflow: str | None = None
    transaction_id: str | None = None
    input: Any = None
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    wait: float | None = None
    """``api.start`` only: answer once the transaction finishes or only waits on async steps,
    with its ``result`` (as ``get`` gives it), if that happens within ``wait`` seconds; the
    answer comes without a result otherwise (a duplicate start, a start that runs in another
    coordinator's process, or one still running then): watch its events, or ask ``get``."""


class StepRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``cancel`` (by transaction id) or ``set_step_success`` / ``set_step_failure`` /
    ``retry_step`` (by the step's idempotency key)."""

    transaction_id: str | None = None
    idempotency_key: str | None = None
    response: Any = None
    error: str | None = None
    error_type: str | None = None
    force_permanent: bool = False


class GetRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    transaction_id: str
    result_from: str | None = None
    """Give this step's output as the result."""


class ListRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    workflow: str | None = None
    state: str | None = None


class ApiReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The answer to any request: ``ok`` or an ``error`` with its ``error_type``."""

    ok: bool
    transaction_id: str | None = None
    duplicate: bool = False
    """``start``: a start of this transaction id came moments ago (this one was dropped); the
    transaction may have run already: ask ``get``. Otherwise its events tell how it goes (a start
    of a transaction that exists answers with its ``finish``, or ``suspend``, event)."""
    state: str | None = None
    settled: bool = False
    result: WorkflowResult | None = None
    results: list[WorkflowResult] | None = None
    error: str | None = None
    error_type: str | None = None


def content_type(headers: Mapping[str, str] | None, data: bytes) -> str:
    """The encoding of a request: its ``Content-Type``, else JSON if it looks like JSON."""
    if headers:
        value = headers.get("Content-Type") or headers.get("content-type")
        if value:
            return JSON if "json" in value else MSGPACK
    return JSON if data[:1] in (b"{", b"[", b" ", b"\n") else MSGPACK


def decode_request(data: bytes, kind: type[T], encoding: str) -> T:
    """Decode a request, or raise :class:`ProtocolError` that says what is wrong."""
    try:
        if encoding == JSON:
            return msgspec.json.decode(data, type=kind)
        return msgspec.msgpack.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {kind.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        what = "JSON" if encoding == JSON else "msgpack"
        raise ProtocolError(f"the payload is not valid {what}: {exc}") from None


def encode_reply(reply: ApiReply, encoding: str) -> bytes:
    """Encode a reply in the request's encoding."""
    if encoding == JSON:
        return msgspec.json.encode(reply)
    return msgspec.msgpack.encode(reply)
