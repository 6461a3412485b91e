"""A client waiting for an outcome whose events are lost (events are sent at most once: a NATS
restart drops those in flight) still gets it, from its periodic read of the state."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator import TransactionState, create_step, create_workflow
from orchestrator._client import Client
from orchestrator.services import Coordinator, Worker
from transport import Handler, MemoryTransport, Msg, Subscription

pytestmark = pytest.mark.anyio


async def _add(data: dict[str, Any]) -> dict[str, Any]:
    return {"n": data["n"] + 1}


add = create_step("rc-add", _add)
flow = create_workflow("rc-flow", lambda inp: add(inp))


class DeafToEvents:
    """The services' transport, as seen by a client that never hears a lifecycle event."""

    def __init__(self, inner: MemoryTransport) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def subscribe(self, subject: str, handler: Handler, **options: Any) -> Subscription:
        def deaf(msg: Msg) -> None:
            if ".evt." not in msg.subject:
                handler(msg)

        return await self.inner.subscribe(subject, deaf, **options)


async def test_run_returns_although_every_event_is_lost() -> None:
    async with (
        MemoryTransport() as transport,
        Coordinator([flow], transport=transport, prefix="rc", lease_ttl=None),
        Worker([flow], transport=transport, prefix="rc"),
    ):
        client = Client(DeafToEvents(transport), prefix="rc", owns_transport=False, recheck=0.1)
        async with client:
            with anyio.fail_after(10):
                result = await client.run(flow, {"n": 1}, transaction_id="rc-1")
                waited = await client.wait("rc-1")
    assert result.state is TransactionState.DONE
    assert result.result == {"n": 2}
    assert waited.result == {"n": 2}
