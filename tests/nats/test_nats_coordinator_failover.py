"""A coordinator killed (SIGKILL) while its transaction waits on a retry timer: the other
coordinator takes the partitions over once the leases run out, re-arms the timer from the
checkpoint, and the transaction finishes. Coordinators and the worker are real processes."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest
from fault_app import RETRY_INTERVAL, runs_of, start_service

from actors import Mailbox
from orchestrator import LifecycleEvent, TransactionState
from orchestrator._client import Client
from transport import Msg, NatsServer, NatsTransport

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

ACK_WAIT = 2.0
LEASE_TTL = 1.0
_prefixes = itertools.count(1)


async def test_a_surviving_coordinator_takes_over_and_fires_the_dead_ones_timer(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    prefix, runs = f"fo{next(_prefixes)}", tmp_path / "runs.txt"

    async def service(role: str) -> anyio.abc.Process:
        return await start_service(
            role, nats_server.url, prefix, runs, ack_wait=ACK_WAIT, lease_ttl=LEASE_TTL
        )

    procs = [await service("coordinator"), await service("worker")]
    first = procs[0]
    try:
        async with Client(NatsTransport(nats_server.url), prefix=prefix) as client:
            events: Mailbox[Msg] = Mailbox()  # subscribed before the start: nothing missed
            await client.transport.subscribe(
                client.subjects.event("fault-retry", "retry-1"), events.send
            )
            with anyio.fail_after(30):
                # The first coordinator owns every partition: it runs the transaction, which
                # fails its first attempt (persisted, then announced) and waits for the retry.
                await client.start("fault-retry", {"n": 1}, transaction_id="retry-1")
                while True:
                    event = msgspec.json.decode((await events.get()).data, type=LifecycleEvent)
                    if event.type == "step_failure" and event.step == "f-flaky":
                        break
                procs.append(await service("coordinator"))
                first.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                await first.wait()
                result = await client.wait("retry-1")
            took = time.monotonic() - killed_at
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        with anyio.fail_after(10):
            for proc in procs:
                await proc.wait()

    assert result.state is TransactionState.DONE, result.errors
    assert result.result == {"attempt": 2}
    assert [r for r in runs_of(runs) if r[1] == "f-flaky"] == [
        ("retry-1", "f-flaky", "invoke", 1),
        ("retry-1", "f-flaky", "invoke", 2),
    ]
    # The retry came from the survivor: within the lease ttl plus a renewal round or two of
    # the retry's own due time (the kill came before it), not after an ack_wait or never.
    assert took < RETRY_INTERVAL + 3 * LEASE_TTL + ACK_WAIT, took
