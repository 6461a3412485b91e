"""A worker that stops gracefully hands its in-flight step commands back at once."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator import StepContext, create_step, create_workflow
from orchestrator._client import Client
from orchestrator.services import Coordinator, Worker
from transport import NatsTransport

pytestmark = pytest.mark.anyio


async def test_a_stopping_worker_hands_back_its_running_step(nats_server: Any) -> None:
    url = nats_server.url
    seen: list[str] = []
    first_started = anyio.Event()

    @create_step("handback-slow")
    async def slow(data: Any, ctx: StepContext) -> str:
        who = ctx.container.resolve("who")
        seen.append(who)
        if len(seen) == 1:
            first_started.set()
            await anyio.sleep_forever()  # until its worker stops
        return f"done by {who}"

    @create_workflow("handback")
    def wf(input: Any) -> Any:
        return slow(input)

    prefix = "handback"
    stops = {"A": anyio.Event(), "B": anyio.Event()}

    async def worker(who: str, ready: anyio.Event) -> None:
        # Each worker in its own task: services nest their task groups, so they stop in the
        # task that started them.
        async with (
            NatsTransport(url) as transport,
            Worker([wf], transport=transport, prefix=prefix, container={"who": who}),
        ):
            ready.set()
            await stops[who].wait()

    async with (
        NatsTransport(url) as ct,
        Coordinator([wf], transport=ct, prefix=prefix),
        anyio.create_task_group() as tg,
    ):
        for who in stops:
            ready = anyio.Event()
            tg.start_soon(worker, who, ready)
            await ready.wait()
        async with Client(NatsTransport(url), prefix=prefix) as client:
            handle = await client.start(wf, transaction_id="hb-1")
            with anyio.fail_after(10):
                await first_started.wait()
                stops[seen[0]].set()  # a graceful stop while the handler runs
                # ack_wait is 30 s: only a hand-back gets the step to the other worker this soon
                result = await handle.wait()
        for stop in stops.values():
            stop.set()

    other = "B" if seen[0] == "A" else "A"
    assert result.state.value == "done"
    assert result.result == f"done by {other}"
    assert seen == [seen[0], other]
