"""Fixtures for every test folder: the async backend and a real nats-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from transport import NatsServer


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio (the backend the services use)."""
    return "asyncio"


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server with JetStream, shared by the whole session (tests use own namespaces)."""
    with NatsServer() as server:
        yield server
