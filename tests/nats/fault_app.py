"""The app of the worker fault tests: a step that crashes its worker, hangs once, or runs long.

Run as a worker: ``python fault_app.py URL PREFIX RUNS ACK_WAIT MAX_DELIVER``. Every handler run
appends ``<transaction> <step> <action> <attempt>`` to the file ``RUNS`` (and prints it) before
it does anything else, so a run cut off by a kill still shows.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio

from orchestrator import StepContext, create_step, create_workflow


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


reserve_step = create_step("f-reserve", reserve, release)
work_step = create_step("f-work", work)


@create_workflow("fault-order")
def fault_order(input: Any) -> Any:
    return work_step(reserve_step(input))


async def serve(url: str, prefix: str, runs: str, ack_wait: float, max_deliver: int) -> None:
    from orchestrator.services import Worker
    from transport import NatsTransport

    async with (
        NatsTransport(url, name="fault-worker") as transport,
        Worker(
            [fault_order],
            transport=transport,
            prefix=prefix,
            container={"runs": runs},
            ack_wait=ack_wait,
            max_deliver=max_deliver,
        ),
    ):
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    url, prefix, runs, ack_wait, max_deliver = sys.argv[1:]
    anyio.run(serve, url, prefix, runs, float(ack_wait), int(max_deliver))
