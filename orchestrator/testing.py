"""What our own tests use, for users' tests: engines, a real nats-server, log capture.

```python
from orchestrator.testing import capture_logs, distributed, local_engine, nats_server

async def test_checkout():
    async with local_engine([checkout], container={"inventory": FakeInventory()}) as engine:
        result = await engine.run(checkout, {"items": [...]})

async def test_checkout_over_nats():
    with nats_server() as server:
        async with distributed([checkout], container=..., url=server.url) as client:
            result = await client.run("checkout", {"items": [...]})
```
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from structlog.testing import capture_logs as capture_logs

from transport import MemoryTransport, NatsServer, NatsTransport

from ._client import Client
from ._composer import Workflow
from ._local import LocalEngine
from .services import Coordinator, Worker

__all__ = ["capture_logs", "distributed", "local_engine", "nats_server"]

_prefixes = itertools.count(1)


@contextlib.asynccontextmanager
async def local_engine(
    workflows: Iterable[Workflow], container: Any = None, **options: Any
) -> AsyncIterator[LocalEngine]:
    """A running :class:`LocalEngine` for the duration of the ``async with`` block."""
    async with LocalEngine(workflows, container, **options) as engine:
        yield engine


@contextlib.contextmanager
def nats_server(config: str | None = None) -> Iterator[NatsServer]:
    """A real nats-server (from the virtualenv) on a free loopback port, with JetStream in a
    temporary directory; ``config`` is extra configuration text."""
    with NatsServer(config=config) as server:
        yield server


@contextlib.asynccontextmanager
async def distributed(
    workflows: Iterable[Workflow],
    container: Any = None,
    *,
    url: str | None = None,
    prefix: str | None = None,
    retention: float | None = None,
    concurrency: int | None = None,
) -> AsyncIterator[Client]:
    """A coordinator, a worker and a client, as they run in production: over NATS at ``url``
    (each with its own connection), or over one in-memory transport when ``url`` is None.

    Each call gets its own ``prefix`` unless given, so tests can share one server.
    """
    workflows = list(workflows)
    prefix = prefix or f"t{next(_prefixes)}"
    async with contextlib.AsyncExitStack() as stack:
        if url is None:
            shared = await stack.enter_async_context(MemoryTransport())
            transports: list[Any] = [shared, shared]
            client = Client(shared, prefix=prefix, owns_transport=False)
        else:
            transports = [await stack.enter_async_context(NatsTransport(url)) for _ in range(2)]
            client = Client(NatsTransport(url), prefix=prefix)
        options: dict[str, Any] = {} if retention is None else {"retention": retention}
        await stack.enter_async_context(
            Coordinator(workflows, transport=transports[0], prefix=prefix, **options)
        )
        await stack.enter_async_context(
            Worker(
                workflows,
                transport=transports[1],
                container=container,
                prefix=prefix,
                concurrency=concurrency,
            )
        )
        yield await stack.enter_async_context(client)
