"""The app of the chaos test: workflows whose steps follow a per-transaction plan and record
every attempt in a side-effect ledger.

Each workflow input is ``{"seed": ..., "plan": {...}}``. The plan says, per step name:

* ``fail``: ``{step: "permanent" | "exhaust"}``: the step fails for good, at once
  (``PermanentFailure``) or on every attempt until its retries are spent;
* ``flaky``: ``{step: n}``: the step fails on its first ``n`` attempts (``n <= MAX_RETRIES``),
  then succeeds;
* ``comp_flaky``: ``[step, ...]``: the step's compensation fails on its first attempt.

``chaos-nest`` runs the workflow ``chaos-sub`` as a step (``run_as_step``): the child is a
transaction of its own, ``<tx>:chaos-sub-as-step`` (``:attempt-2`` when the nested step runs
again), usually in another partition. Its input carries the parent's seed and plan, and its
context is the parent's, so its steps fail, flake and compensate by the same plan; they record
under the child's transaction id.

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
from orchestrator.services import loop_options

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


def _flat(prev: list[Any]) -> list[Any]:
    """The outputs the steps before hand on: a nested workflow's result (a dict of its steps'
    outputs) counts as every output in it, in key order."""
    out: list[Any] = []
    for p in prev:
        if isinstance(p, dict):
            out.extend(_flat([p[k] for k in sorted(p)]))
        else:
            out.append(p)
    return out


def _first_input(v: Any) -> dict[str, Any]:
    """The input of a first-layer step: a nested workflow's first steps see the outputs its
    parent handed on (``prev`` of the child's input); a top-level workflow's see none."""
    return _input(v["data"], *v["data"].get("prev", []))


def _next_input(v: Any) -> dict[str, Any]:
    return _input(v["data"], *_flat(v["prev"]))


Layer = int | str
"""A layer of a shape: that many steps (a ``parallelize`` group when more than one), or the name
of a nested workflow (of ``CHILD_SHAPES``), run as one step with ``run_as_step``."""


def _shape(name: str, layers: list[Layer]) -> Workflow:
    """A workflow of layers: every step of a layer waits for every step of the one before;
    a layer of several steps is a ``parallelize`` group, a layer naming a child workflow runs it
    nested (``<child>-as-step``, with ``NESTED_RETRIES``). The result maps step -> output (a
    nested step's output is its child's result)."""
    count = sum(w for w in layers if isinstance(w, int))
    steps = {
        f"{name}-{chr(ord('a') + i)}": chaos_step(f"{name}-{chr(ord('a') + i)}")
        for i in range(count)
    }
    names = list(steps)

    def composer(data: Any) -> Any:
        from orchestrator import transform

        outputs: dict[str, Any] = {}
        previous: list[Any] = []
        at = 0
        for entry in layers:
            args = transform(
                {"data": data, "prev": previous}, _next_input if previous else _first_input
            )
            if isinstance(entry, str):
                nested = (
                    CHILDREN[entry]
                    .run_as_step(input=args)
                    .config(max_retries=NESTED_RETRIES, retry_interval=RETRY_INTERVAL)
                )
                outputs[f"{entry}-as-step"] = nested
                previous = [nested]
                continue
            layer = names[at : at + entry]
            at += entry
            calls = [steps[s](args) for s in layer]
            refs = list(parallelize(*calls)) if entry > 1 else calls
            outputs.update(zip(layer, refs, strict=True))
            previous = refs
        return dict(outputs)

    return create_workflow(name, composer)


NESTED_RETRIES = 1
"""Retries of a nested step: a child that reverted runs again once, as ``<tx>:<step>:attempt-2``
(it does the same, its plan being the same)."""

CHILD_SHAPES: dict[str, list[Layer]] = {
    "chaos-sub": [1, 2],  # x -> (y | z), nested in chaos-nest
}
"""The workflows that only run nested (their steps follow the parent's plan)."""

CHILDREN: dict[str, Workflow] = {
    name: _shape(name, layers) for name, layers in CHILD_SHAPES.items()
}

SHAPES: dict[str, list[Layer]] = {
    "chaos-fan": [1, 2, 1],  # a -> (b | c) -> d
    "chaos-wide": [1, 1, 3],  # a -> b -> (c | d | e)
    "chaos-join": [2, 1],  # (a | b) -> c
    "chaos-mix": [1, 2, 2],  # a -> (b | c) -> (d | e)
    "chaos-nest": [1, "chaos-sub", 1],  # a -> chaos-sub-as-step (x -> (y | z)) -> b
}
"""The workflow shapes: steps per layer (3 to 5 steps, with parallel groups), and one with a
nested workflow."""

WORKFLOWS: dict[str, Workflow] = {name: _shape(name, layers) for name, layers in SHAPES.items()}
"""The workflows the harness starts (the nested ones come with their parents)."""


def workflow_of(name: str) -> Workflow:
    """A workflow of the app by name, nested ones included."""
    return WORKFLOWS[name] if name in WORKFLOWS else CHILDREN[name]


def layers_of(workflow: str) -> list[list[str]]:
    """The node names of a workflow (steps and nested steps), layer by layer (as its graph
    orders them)."""
    nodes = [n for n in workflow_of(workflow).graph.nodes if n.kind in ("step", "subflow")]
    level: dict[str, int] = {}
    for node in nodes:
        level[node.name] = 1 + max((level[a] for a in node.after if a in level), default=-1)
    out: list[list[str]] = [[] for _ in range(1 + max(level.values()))]
    for node in nodes:
        out[level[node.name]].append(node.name)
    return out


def plan_steps(workflow: str) -> list[str]:
    """The step names a plan of ``workflow`` covers: its own steps and, in place of a nested
    step, those of the child (recursively), in layer order."""
    index = {n.name: n for n in workflow_of(workflow).graph.nodes}
    out: list[str] = []
    for layer in layers_of(workflow):
        for name in layer:
            child = index[name].workflow
            out.extend(plan_steps(child) if index[name].kind == "subflow" and child else [name])
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
    anyio.run(serve, args, backend_options=loop_options())  # the services' loop (uvloop)


if __name__ == "__main__":
    main()
