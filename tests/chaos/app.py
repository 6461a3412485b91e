"""The app of the chaos test: workflows whose steps follow a per-transaction plan and record
every attempt in a side-effect ledger.

Each workflow input is ``{"seed": ..., "plan": {...}}``. The plan says, per step name:

* ``fail``: ``{step: "permanent" | "exhaust"}``: the step fails for good, at once
  (``PermanentFailure``) or on every attempt until its retries are spent;
* ``flaky``: ``{step: n}``: the step fails on its first ``n`` attempts (``n <= MAX_RETRIES``),
  then succeeds;
* ``comp_flaky``: ``[step, ...]``: the step's compensation fails on its first attempt.

The ledger is a SQLite file. Table ``attempts`` has one row per (idempotency key, attempt): the
stable identity of an effect, so a redelivered attempt (its worker was killed mid-step) updates
the row instead of adding one, and counts itself in ``deliveries``. Table ``deliveries`` has one
row per handler run. Times are wall-clock (``time.time()``), comparable across the processes of
one machine.

Run as a service (it prints ``ready`` once serving)::

    python tests/chaos/app.py coordinator|worker --nats URL[,URL...] --prefix P --ledger PATH

This module imports nothing from the tests, so it also runs by path.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from orchestrator import (
    PermanentFailure,
    StepContext,
    StepResponse,
    Workflow,
    create_step,
    create_workflow,
    parallelize,
)
from orchestrator._step import Step

MAX_RETRIES = 2
"""Retries of every step's invoke and compensation (so a flaky compensation recovers)."""
RETRY_INTERVAL = 0.1
"""Seconds before the first retry (then doubling): retries go through the coordinator's timers."""
WORK_TIME = (0.005, 0.03)
"""Seconds a handler works (uniform in this range): long enough to be killed in the middle."""

SCHEMA = """
pragma journal_mode = wal;
create table if not exists attempts (
    key text not null, attempt integer not null,
    tx text not null, step text not null, action text not null,
    started real not null, ended real, outcome text, payload text,
    deliveries integer not null default 1,
    primary key (key, attempt)
);
create table if not exists deliveries (
    key text not null, attempt integer not null, tx text not null, step text not null,
    action text not null, pid integer not null, started real not null, ended real,
    outcome text
);
"""

# --- the ledger -------------------------------------------------------------------------------


def open_ledger(path: str) -> sqlite3.Connection:
    """A connection to the ledger (created if missing), waiting on other writers' locks."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.executescript(SCHEMA)
    db.execute("pragma synchronous = normal")
    return db


class Ledger:
    """What the step handlers of one worker write; one connection per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = os.getpid()
        self._local: dict[int, sqlite3.Connection] = {}

    def _db(self) -> sqlite3.Connection:
        import threading

        ident = threading.get_ident()
        db = self._local.get(ident)
        if db is None:
            db = self._local[ident] = open_ledger(self.path)
        return db

    def begin(self, ctx: StepContext, payload: Any = None) -> int:
        """Record that a delivery of this attempt started; returns the delivery's row id."""
        db = self._db()
        now = time.time()
        text = json.dumps(payload, sort_keys=True)
        key, tx, step, action = ctx.idempotency_key, ctx.transaction_id, ctx.step_name, ctx.action
        with db:
            db.execute("begin immediate")
            db.execute(
                "insert into attempts (key, attempt, tx, step, action, started, payload) "
                "values (?, ?, ?, ?, ?, ?, ?) on conflict (key, attempt) "
                "do update set deliveries = deliveries + 1",
                (key, ctx.attempt, tx, step, action, now, text),
            )
            cursor = db.execute(
                "insert into deliveries (key, attempt, tx, step, action, pid, started) "
                "values (?, ?, ?, ?, ?, ?, ?)",
                (key, ctx.attempt, tx, step, action, self._pid, now),
            )
        row = cursor.lastrowid
        assert row is not None
        return row

    def end(self, ctx: StepContext, delivery: int, outcome: str) -> None:
        """Record how the delivery ended; an attempt keeps the end of its first finished run."""
        db = self._db()
        now = time.time()
        with db:
            db.execute("begin immediate")
            db.execute(
                "update attempts set ended = coalesce(ended, ?), outcome = coalesce(outcome, ?) "
                "where key = ? and attempt = ?",
                (now, outcome, ctx.idempotency_key, ctx.attempt),
            )
            db.execute(
                "update deliveries set ended = ?, outcome = ? where rowid = ?",
                (now, outcome, delivery),
            )


# --- the steps and workflows ---------------------------------------------------------------


def step_output(name: str, seed: str, prev: list[str]) -> str:
    """What step ``name`` returns, given the outputs of the steps before it (the model's too)."""
    return f"{name}[{seed}]({'+'.join(sorted(prev))})"


def _work(ctx: StepContext) -> None:
    digest = sum(ctx.idempotency_key.encode()) + ctx.attempt
    low, high = WORK_TIME
    time.sleep(low + (high - low) * ((digest * 7919) % 1000) / 1000)


def chaos_step(name: str) -> Step:
    """A step that does what the transaction's plan says, recording every attempt."""

    def invoke(data: dict[str, Any], ctx: StepContext) -> StepResponse[str]:
        ledger: Ledger = ctx.container.resolve("ledger")
        delivery = ledger.begin(ctx)
        outcome = "error"
        try:
            _work(ctx)
            plan = data["plan"]
            failing = plan.get("fail", {}).get(name)
            if failing == "permanent":
                outcome = "permanent"
                raise PermanentFailure(f"{name} fails for good (planned)")
            if failing == "exhaust":
                raise RuntimeError(f"{name} fails on attempt {ctx.attempt} (planned, every one)")
            if ctx.attempt <= plan.get("flaky", {}).get(name, 0):
                raise RuntimeError(f"{name} flakes on attempt {ctx.attempt} (planned)")
            prev = [p for p in data.get("prev", []) if p is not None]
            output = step_output(name, data["seed"], prev)
            outcome = "ok"
            return StepResponse(output, compensate_input={"step": name, "output": output})
        finally:
            ledger.end(ctx, delivery, outcome)

    def compensate(data: Any, ctx: StepContext) -> None:
        ledger: Ledger = ctx.container.resolve("ledger")
        delivery = ledger.begin(ctx, payload=data)
        outcome = "error"
        try:
            _work(ctx)
            flaky = ctx.context.get("comp_flaky", ())
            if name in flaky and ctx.attempt == 1:
                raise RuntimeError(f"compensation of {name} flakes on its first attempt (planned)")
            outcome = "ok"
        finally:
            ledger.end(ctx, delivery, outcome)

    return create_step(
        name, invoke, compensate, max_retries=MAX_RETRIES, retry_interval=RETRY_INTERVAL
    )


def _input(data: Any, *prev: Any) -> dict[str, Any]:
    return {"seed": data["seed"], "plan": data["plan"], "prev": list(prev)}


def _shape(name: str, layers: list[int]) -> Workflow:
    """A workflow of layers: every step of a layer waits for every step of the one before;
    a layer of several steps is a ``parallelize`` group. The result maps step -> output."""
    steps = {
        f"{name}-{chr(ord('a') + i)}": chaos_step(f"{name}-{chr(ord('a') + i)}")
        for i in range(sum(layers))
    }
    names = list(steps)

    def composer(data: Any) -> Any:
        from orchestrator import transform

        outputs: dict[str, Any] = {}
        previous: list[Any] = []
        at = 0
        for width in layers:
            layer = names[at : at + width]
            at += width
            args = transform(
                {"data": data, "prev": previous},
                lambda v: _input(v["data"], *v["prev"]),
            )
            calls = [steps[s](args) for s in layer]
            refs = list(parallelize(*calls)) if width > 1 else calls
            outputs.update(zip(layer, refs, strict=True))
            previous = refs
        return dict(outputs)

    return create_workflow(name, composer)


SHAPES: dict[str, list[int]] = {
    "chaos-fan": [1, 2, 1],  # a -> (b | c) -> d
    "chaos-wide": [1, 1, 3],  # a -> b -> (c | d | e)
    "chaos-join": [2, 1],  # (a | b) -> c
    "chaos-mix": [1, 2, 2],  # a -> (b | c) -> (d | e)
}
"""The workflow shapes: steps per layer (3 to 5 steps, with parallel groups)."""

WORKFLOWS: dict[str, Workflow] = {name: _shape(name, layers) for name, layers in SHAPES.items()}


def layers_of(workflow: str) -> list[list[str]]:
    """The step names of a workflow, layer by layer (as its graph orders them)."""
    nodes = [n for n in WORKFLOWS[workflow].graph.nodes if n.kind == "step"]
    level: dict[str, int] = {}
    for node in nodes:
        level[node.name] = 1 + max((level[a] for a in node.after if a in level), default=-1)
    out: list[list[str]] = [[] for _ in range(1 + max(level.values()))]
    for node in nodes:
        out[level[node.name]].append(node.name)
    return out


# --- running as a service --------------------------------------------------------------------


def _supported(factory: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``factory`` takes today; the others are named on stderr and left out."""
    params = inspect.signature(factory).parameters
    taken = {k: v for k, v in options.items() if v is not None and k in params}
    missing = sorted(k for k, v in options.items() if v is not None and k not in params)
    if missing:
        print(f"note: {factory.__qualname__} has no option {missing} yet", file=sys.stderr)
    return taken


async def serve(args: argparse.Namespace) -> None:
    from orchestrator.services import Coordinator, Worker
    from transport import NatsTransport

    servers = args.nats.split(",")
    options: dict[str, Any] = {
        "prefix": args.prefix,
        "partitions": args.partitions,
        "replicas": args.replicas,
        "ack_wait": args.ack_wait,  # the same for coordinators and workers
    }
    coordinator_options = {**options, "lease_ttl": args.lease_ttl}
    worker_options = {**options, "max_deliver": args.max_deliver}
    connection = {
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "connect_timeout": 2,
        "allow_reconnect": True,
    }
    name = f"chaos-{args.role}-{os.getpid()}"
    async with NatsTransport(servers, name=name, **connection) as transport:
        service: Any
        workflows = list(WORKFLOWS.values())
        if args.role == "coordinator":
            service = Coordinator(
                workflows, transport=transport, **_supported(Coordinator, coordinator_options)
            )
        else:
            service = Worker(
                workflows,
                transport=transport,
                container={"ledger": Ledger(args.ledger)},
                **_supported(Worker, worker_options),
            )
        async with service:
            print("ready", flush=True)
            await anyio.sleep_forever()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A chaos-test service process")
    parser.add_argument("role", choices=["coordinator", "worker"])
    parser.add_argument("--nats", required=True, help="NATS URL(s), comma-separated")
    parser.add_argument("--prefix", default="chaos")
    parser.add_argument("--ledger", required=True, help="the SQLite side-effect ledger")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=None, help="stream/bucket replicas")
    parser.add_argument("--ack-wait", type=float, default=None, help="work-queue ack_wait (s)")
    parser.add_argument("--lease-ttl", type=float, default=None, help="partition lease ttl (s)")
    parser.add_argument(
        "--max-deliver",
        type=int,
        default=None,
        help="worker: deliveries of one step attempt before it fails for good",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    open_ledger(args.ledger).close()
    anyio.run(serve, args)


if __name__ == "__main__":
    main()
