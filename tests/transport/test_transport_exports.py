"""The public names of ``transport``: changing them is a deliberate act (update this list)."""

from __future__ import annotations

import ast
from pathlib import Path

import transport

PUBLIC = [
    "Consumer",
    "Entry",
    "Handler",
    "KeyExistsError",
    "KeyValue",
    "MemoryTransport",
    "Msg",
    "NatsServer",
    "NatsTransport",
    "NoRespondersError",
    "QueueConfig",
    "RequestTimeoutError",
    "RevisionMismatchError",
    "Subscription",
    "Transport",
    "TransportError",
    "WorkHandler",
    "WorkMsg",
]


def test_public_names_are_pinned() -> None:
    assert sorted(transport.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(transport, name) is not None


def test_errors_share_one_root() -> None:
    for error in (
        transport.KeyExistsError,
        transport.RevisionMismatchError,
        transport.RequestTimeoutError,
        transport.NoRespondersError,
    ):
        assert issubclass(error, transport.TransportError)
    assert issubclass(transport.RequestTimeoutError, TimeoutError)


def test_transport_imports_nothing_of_ours() -> None:
    for path in Path(transport.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"orchestrator", "actors"}, (path.name, name)
