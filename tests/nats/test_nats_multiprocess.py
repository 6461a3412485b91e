"""Services in their own processes: a nats-server, one coordinator, two workers hosting
different steps, and a client; 200 workflows with successes, failures and compensations, every
result and every side effect checked against a model."""

from __future__ import annotations

import random
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from orchestrator import TransactionState
from orchestrator._client import Client
from transport import NatsTransport

pytestmark = pytest.mark.anyio

APP = Path(__file__).with_name("mp_app.py")
STEPS = ["mp-reserve", "mp-charge", "mp-ship", "mp-notify"]
FORWARD = {"mp-reserve": 0, "mp-charge": 1, "mp-ship": 2, "mp-notify": 2}


async def _spawn(args: list[str]) -> Process:
    proc = await anyio.open_process([sys.executable, str(APP), *args])
    assert proc.stdout is not None
    with anyio.fail_after(30):
        async for text in TextReceiveStream(proc.stdout):
            if "ready" in text:
                return proc
    raise RuntimeError(f"service {args[0]} did not start")


@pytest.fixture
async def stack(nats_server: Any, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    ledger = tmp_path / "ledger.sqlite"
    prefix = "mp"
    common = [nats_server.url, prefix, str(ledger)]
    procs = [
        await _spawn(["coordinator", *common]),
        await _spawn(["worker", *common, "mp-reserve", "mp-ship"]),
        await _spawn(["worker", *common, "mp-charge", "mp-notify"]),
    ]
    try:
        yield prefix, ledger
    finally:
        for proc in procs:
            proc.terminate()
        with anyio.fail_after(15):
            for proc in procs:
                await proc.wait()


def _plan(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    plan: dict[str, Any] = {}
    if roll < 0.25:
        plan["fail"] = rng.choice(STEPS)
    if rng.random() < 0.3:
        plan["flaky"] = {"mp-charge": rng.randint(1, 2)}  # retried, still within max_retries
    return plan


def _expected(plan: dict[str, Any]) -> tuple[str, set[str]]:
    """The final state and the steps that must be compensated."""
    fail = plan.get("fail")
    if fail is None:
        return "done", set()
    level = FORWARD[fail]
    ran = {s for s, lvl in FORWARD.items() if lvl <= level}
    return "reverted", ran


async def test_two_hundred_workflows_across_processes(stack: tuple[str, Path], nats_server: Any):
    prefix, ledger = stack
    rng = random.Random(42)
    plans = {f"mp-{i}": _plan(rng) for i in range(200)}
    results: dict[str, Any] = {}

    async with Client(NatsTransport(nats_server.url), prefix=prefix) as client:

        async def one(tx: str) -> None:
            results[tx] = await client.run(
                "mp-order", {"plan": plans[tx]}, transaction_id=tx, throw_on_error=False
            )

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for tx in plans:
                    tg.start_soon(one, tx)

    with sqlite3.connect(ledger) as db:
        rows = db.execute("select tx, step, action, attempt, at from ledger order by at").fetchall()
    effects: dict[str, list[tuple[str, str, int, float]]] = {tx: [] for tx in plans}
    for tx, step, action, attempt, at in rows:
        effects[tx].append((step, action, attempt, at))

    for tx, plan in plans.items():
        state, compensated = _expected(plan)
        result = results[tx]
        assert result.state is TransactionState(state), (tx, plan, result.errors)
        invoked = {s for s, a, _, _ in effects[tx] if a == "invoke"}
        undone = [s for s, a, _, _ in effects[tx] if a == "compensate"]
        assert len(undone) == len(set(undone)), f"{tx}: a compensation ran twice: {undone}"
        assert set(undone) == compensated, (tx, plan, undone)
        if state == "done":
            assert invoked == set(STEPS)
            assert result.result == {"shipped": True, "notified": True}
            flaky = plan.get("flaky", {}).get("mp-charge", 0)
            attempts = sorted(n for s, a, n, _ in effects[tx] if s == "mp-charge" and a == "invoke")
            assert attempts == list(range(1, flaky + 2))
        else:
            # reverse dependency order: a step's compensation after those of the steps after it
            at = {s: t for s, a, _, t in effects[tx] if a == "compensate"}
            for step in compensated:
                for later in compensated:
                    if FORWARD[later] > FORWARD[step]:
                        assert at[later] <= at[step], (tx, undone)
            # no forward step started after compensation began
            first_comp = min(at.values())
            assert all(t <= first_comp for s, a, _, t in effects[tx] if a == "invoke")
            assert any(e.step == plan["fail"] for e in result.errors)
