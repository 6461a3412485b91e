"""The app of the fault tests: a step that crashes its worker, hangs once, runs long, or fails
once and is retried after a while.

Run as a service: ``python fault_app.py worker|coordinator URL PREFIX RUNS ACK_WAIT MAX_DELIVER
LEASE_TTL``. Every handler run
appends ``<transaction> <step> <action> <attempt>`` to the file ``RUNS`` (and prints it) before
it does anything else, so a run cut off by a kill still shows.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from orchestrator import StepContext, create_step, create_workflow

RETRY_INTERVAL = 2.0
"""Seconds before the retry of ``f-flaky``: long enough to kill a coordinator meanwhile."""


def record(ctx: StepContext) -> int:
    """Note this run; how many runs of this attempt there were, this one included."""
    path = Path(ctx.container.resolve("runs"))
    line = f"{ctx.transaction_id} {ctx.step_name} {ctx.action} {ctx.attempt}\n"
    with path.open("a") as out:
        out.write(line)
    print("run", line, end="", flush=True)  # for a test that waits until the handler runs
    return path.read_text().count(line)


def runs_of(path: Path) -> list[tuple[str, str, str, int]]:
    """Every run recorded in ``path``, in order."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(tx, step, action, int(attempt)) for tx, step, action, attempt in rows]


async def reserve(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    record(ctx)
    return data


async def release(data: Any, ctx: StepContext) -> None:
    record(ctx)


async def work(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    runs = record(ctx)
    mode = data["mode"]
    if mode == "crash":  # the worker dies under this handler, every time
        os._exit(17)
    if mode == "hang_first" and runs == 1:  # the first run never ends (its worker gets killed)
        await anyio.sleep_forever()
    if mode == "slow":  # longer than ack_wait: the heartbeat keeps it from being redelivered
        await anyio.sleep(data["seconds"])
    return {"worked": mode, "runs": runs}


async def flaky(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    record(ctx)
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails; the retry comes after retry_interval")
    return {"attempt": ctx.attempt}


reserve_step = create_step("f-reserve", reserve, release)
work_step = create_step("f-work", work)
flaky_step = create_step("f-flaky", flaky, max_retries=1, retry_interval=RETRY_INTERVAL)


@create_workflow("fault-order")
def fault_order(input: Any) -> Any:
    return work_step(reserve_step(input))


@create_workflow("fault-retry")
def fault_retry(input: Any) -> Any:
    return flaky_step(reserve_step(input))


WORKFLOWS = [fault_order, fault_retry]


async def serve(role: str, url: str, prefix: str, runs: str, *settings: str) -> None:
    from orchestrator.services import Coordinator, Worker
    from transport import NatsTransport

    ack_wait, max_deliver, lease_ttl = float(settings[0]), int(settings[1]), float(settings[2])
    async with NatsTransport(url, name=f"fault-{role}") as transport:
        service: Coordinator | Worker
        if role == "coordinator":
            service = Coordinator(
                WORKFLOWS,
                transport=transport,
                prefix=prefix,
                ack_wait=ack_wait,
                lease_ttl=lease_ttl,
            )
        else:
            service = Worker(
                WORKFLOWS,
                transport=transport,
                prefix=prefix,
                container={"runs": runs},
                ack_wait=ack_wait,
                max_deliver=max_deliver,
            )
        async with service:
            print("ready", flush=True)
            await anyio.sleep_forever()


async def start_service(
    role: str,
    url: str,
    prefix: str,
    runs: Path,
    *,
    ack_wait: float,
    max_deliver: int = 5,
    lease_ttl: float = 1.0,
) -> Process:
    """Start this app as a service process and wait (with a deadline) until it serves."""
    settings = [str(ack_wait), str(max_deliver), str(lease_ttl)]
    proc = await anyio.open_process(
        [sys.executable, __file__, role, url, prefix, str(runs), *settings]
    )
    assert proc.stdout is not None
    try:
        with anyio.fail_after(30):
            async for text in TextReceiveStream(proc.stdout):
                if "ready" in text:
                    return proc
    except BaseException:
        proc.kill()
        raise
    raise RuntimeError(f"the {role} did not start")


if __name__ == "__main__":
    anyio.run(serve, *sys.argv[1:])
