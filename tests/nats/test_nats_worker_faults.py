"""Workers that die under a step: redelivery, the in-progress heartbeat, and ``max_deliver``.

A coordinator runs in the test process; workers are real processes (``fault_app.py``) that the
tests kill with SIGKILL, or whose handler kills them, and start again.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from fault_app import WORKFLOWS, runs_of, start_service

from orchestrator import TransactionState
from orchestrator._client import Client
from orchestrator.services import Coordinator
from transport import NatsServer, NatsTransport

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

ACK_WAIT = 1.0
MAX_DELIVER = 3
_prefixes = itertools.count(1)


class Stack:
    """A coordinator in this process, a client, and worker processes started on demand."""

    def __init__(self, server: NatsServer, prefix: str, runs: Path, client: Client) -> None:
        self.server = server
        self.prefix = prefix
        self.runs = runs
        self.client = client
        self.workers: list[Process] = []

    async def worker(self) -> Process:
        """Start a worker process and wait until it serves."""
        proc = await start_service(
            "worker",
            self.server.url,
            self.prefix,
            self.runs,
            ack_wait=ACK_WAIT,
            max_deliver=MAX_DELIVER,
        )
        self.workers.append(proc)
        return proc

    @staticmethod
    async def wait_for_run(proc: Process, run: str) -> None:
        """Wait (with a deadline) until the worker ``proc`` says it runs ``run``."""
        assert proc.stdout is not None
        seen = ""
        with anyio.fail_after(30):
            async for text in TextReceiveStream(proc.stdout):
                seen += text
                if f"run {run}\n" in seen:
                    return
        raise RuntimeError(f"the worker ended without running {run}")


@pytest.fixture
async def stack(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Stack]:
    prefix = f"wf{next(_prefixes)}"
    async with (
        NatsTransport(nats_server.url, name="fault-coordinator") as transport,
        Coordinator(WORKFLOWS, transport=transport, prefix=prefix, ack_wait=ACK_WAIT) as coord,
        Client(NatsTransport(nats_server.url), prefix=prefix) as client,
    ):
        assert coord.leases is not None
        await coord.leases.wait_owned(timeout=30)
        stack = Stack(nats_server, prefix, tmp_path / "runs.txt", client)
        try:
            yield stack
        finally:
            for proc in stack.workers:
                if proc.returncode is None:
                    proc.kill()
            with anyio.fail_after(10):
                for proc in stack.workers:
                    await proc.wait()


async def test_a_step_killed_with_its_worker_is_delivered_again_and_completes(stack: Stack):
    first = await stack.worker()
    await stack.client.start("fault-order", {"mode": "hang_first"}, transaction_id="hang-1")
    await stack.wait_for_run(first, "hang-1 f-work invoke 1")
    first.send_signal(signal.SIGKILL)
    await first.wait()
    await stack.worker()  # the redelivery (after ack_wait) goes to the new worker

    result = await stack.client.wait("hang-1", timeout=30)

    assert result.state is TransactionState.DONE, result.errors
    assert result.result == {"worked": "hang_first", "runs": 2}
    runs = runs_of(stack.runs)
    # The same attempt ran again (at least once per attempt), nothing was compensated.
    assert runs.count(("hang-1", "f-work", "invoke", 1)) == 2
    assert ("hang-1", "f-work", "invoke", 2) not in runs
    assert not [r for r in runs if r[2] == "compensate"]


async def test_a_handler_running_longer_than_ack_wait_is_not_delivered_again(stack: Stack):
    await stack.worker()
    seconds = 3 * ACK_WAIT

    result = await stack.client.run(
        "fault-order", {"mode": "slow", "seconds": seconds}, transaction_id="slow-1", timeout=30
    )

    assert result.state is TransactionState.DONE, result.errors
    assert runs_of(stack.runs).count(("slow-1", "f-work", "invoke", 1)) == 1


async def test_a_step_that_kills_its_worker_every_time_fails_for_good_and_compensates(
    stack: Stack,
):
    await stack.client.start("fault-order", {"mode": "crash"}, transaction_id="crash-1")

    async def keep_a_worker_running() -> None:
        while True:  # the handler kills it each time: start another (bounded by the deadline)
            proc = await stack.worker()
            await proc.wait()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_a_worker_running)
            result = await stack.client.wait("crash-1")
            tg.cancel_scope.cancel()

    assert result.state is TransactionState.REVERTED
    [error] = [e for e in result.errors if e.step == "f-work"]
    assert error.type == "StepDeliveryError"
    assert f"delivered {MAX_DELIVER + 1} times" in error.message
    assert f"max_deliver={MAX_DELIVER}" in error.message
    runs = runs_of(stack.runs)
    assert runs.count(("crash-1", "f-work", "invoke", 1)) == MAX_DELIVER
    assert ("crash-1", "f-reserve", "compensate", 1) in runs
