"""The app of the multi-process test: a saga whose steps record every effect in a ledger.

Run as a service: ``python mp_app.py coordinator|worker URL PREFIX LEDGER [STEP ...]``.
The ledger is a SQLite file, unique on (transaction, step, action, attempt), so a duplicated
effect would show.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from typing import Any

import anyio

from orchestrator import StepContext, create_step, create_workflow, parallelize

LEDGER_SCHEMA = """
create table if not exists ledger (
    tx text not null, step text not null, action text not null, attempt integer not null,
    at real not null, unique (tx, step, action, attempt)
)
"""


def record(ctx: StepContext) -> None:
    path = ctx.container.resolve("ledger")
    with sqlite3.connect(path, timeout=30) as db:
        db.execute(
            "insert into ledger values (?, ?, ?, ?, ?)",
            (ctx.transaction_id, ctx.step_name, ctx.action, ctx.attempt, time.time()),
        )


def _step(name: str, retries: int = 0) -> Any:
    async def invoke(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        record(ctx)
        plan = data.get("plan", {})
        flaky = plan.get("flaky", {}).get(name, 0)
        if ctx.attempt <= flaky:
            raise RuntimeError(f"{name} flaked on attempt {ctx.attempt}")
        if plan.get("fail") == name:
            raise RuntimeError(f"{name} failed")
        return {**data, name: True}

    async def compensate(data: Any, ctx: StepContext) -> None:
        record(ctx)

    return create_step(name, invoke, compensate, max_retries=retries)


reserve = _step("mp-reserve")
charge = _step("mp-charge", retries=2)
ship = _step("mp-ship")
notify = _step("mp-notify", retries=1)


@create_workflow("mp-order")
def order(input: Any) -> Any:
    r = reserve(input)
    c = charge(r)
    s, n = parallelize(ship(c), notify(c))
    return {"shipped": s["mp-ship"], "notified": n["mp-notify"]}


WORKFLOWS = [order]


async def serve(role: str, url: str, prefix: str, ledger: str, steps: list[str]) -> None:
    from orchestrator.services import Coordinator, Worker
    from transport import NatsTransport

    async with NatsTransport(url, name=f"mp-{role}") as transport:
        service: Any
        if role == "coordinator":
            service = Coordinator(WORKFLOWS, transport=transport, prefix=prefix)
        else:
            service = Worker(
                WORKFLOWS,
                transport=transport,
                prefix=prefix,
                container={"ledger": ledger},
                steps=steps or None,
            )
        async with service:
            print("ready", flush=True)
            await anyio.sleep_forever()


if __name__ == "__main__":
    role, url, prefix, ledger, *steps = sys.argv[1:]
    with sqlite3.connect(ledger) as db:
        db.execute(LEDGER_SCHEMA)
    anyio.run(serve, role, url, prefix, ledger, steps)
