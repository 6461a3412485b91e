"""The distributed services: coordinators and workers, on any transport (NATS in production).

``Coordinator`` runs the gateway (public start and API subjects) and the coordinator actors,
keeping transactions in the key-value store; ``Worker`` runs step executors. Both take a
connected transport and the workflows they serve; neither keeps a global registry.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from actors import (
    ActorSystem,
    CoordinatorHost,
    ExecutorHost,
    Gateway,
    KvStore,
    PartitionLeases,
    Store,
    Subjects,
)
from actors._gateway import DEFAULT_MAX_PAYLOAD
from actors._subjects import DEFAULT_ACK_WAIT
from actors.executor import DEFAULT_MAX_DELIVER
from transport import Transport

from ._composer import Workflow
from ._errors import ConfigurationError
from ._runner import loop_options
from ._step import Step, as_container

__all__ = [
    "DEFAULT_ACK_WAIT",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_LOG_AGE",
    "DEFAULT_MAX_DELIVER",
    "DEFAULT_RETENTION",
    "Coordinator",
    "Worker",
    "collect_workflows",
    "loop_options",
    "step_table",
]

DEFAULT_RETENTION = 86400.0
"""Seconds a finished transaction is kept (for idempotent re-runs and ``get``): one day."""

DEFAULT_LOG_AGE = 86400.0
"""Seconds lifecycle events and hook payloads are kept in their streams: one day."""

DEFAULT_EVENT_LOG_BYTES = 64 * 1024 * 1024
"""The most the lifecycle-event stream holds, in the servers' memory (the oldest events go first):
64 MiB, some 200,000 events; the server's ``max_memory_store`` must leave room for it."""

DEFAULT_LEASE_TTL = 5.0
"""Seconds a coordinator's partition lease lives without renewal: a coordinator that dies loses
its partitions to the others within about this long."""

_START_HERE_TIMEOUT = 5.0
"""Seconds an API start waits for its first turn in this process before it takes the work
queue instead (the store slow or away): a start that was run meanwhile is then a duplicate."""


def service_id(kind: str) -> str:
    """A unique name for one service process: kind, host, process id and a random part (only
    letters, digits, ``-`` and ``_``, as lease and key names allow)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
    return f"{kind}-{host}-{os.getpid()}-{os.urandom(3).hex()}"


def collect_workflows(workflows: Iterable[Workflow]) -> dict[str, Workflow]:
    """The workflows by name, nested ones included; a name used twice is an error."""
    found: dict[str, Workflow] = {}
    pending = list(workflows)
    while pending:
        wf = pending.pop()
        if not isinstance(wf, Workflow):
            raise ConfigurationError(f"expected a workflow (from create_workflow), got {wf!r}")
        other = found.get(wf.name)
        if other is not None and other is not wf:
            raise ConfigurationError(f"two different workflows are named {wf.name!r}")
        if other is None:
            found[wf.name] = wf
            pending.extend(wf.children())
    return found


def step_table(
    workflows: Mapping[str, Workflow],
) -> tuple[dict[str, dict[str, Step]], dict[str, int | None]]:
    """Step name -> workflow -> definition, and each step's concurrency limit."""
    steps: dict[str, dict[str, Step]] = {}
    limits: dict[str, int | None] = {}
    for wf in workflows.values():
        definitions = wf.step_definitions()
        for node in wf.graph.nodes:
            if node.kind != "step":
                continue
            steps.setdefault(node.name, {})[wf.name] = definitions[node.name]
            if node.config.concurrency:
                known = limits.get(node.name)
                limits[node.name] = min(known or node.config.concurrency, node.config.concurrency)
    return steps, limits


class _Service:
    def __init__(self) -> None:
        self._stack: contextlib.AsyncExitStack | None = None
        self.started_at = 0.0

    async def __aexit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(*exc)

    async def _enter(self, setup: Any) -> None:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await setup(stack)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        self.started_at = time.time()


class Coordinator(_Service):
    """Runs transactions: ``async with Coordinator(workflows, transport=t):``.

    Coordinators share the partitions through leases in the ``<prefix>_leases`` bucket: each
    runs the transactions of the partitions it holds, a coordinator that stops renewing its
    leases (it died, or lost NATS) loses them within ``lease_ttl`` seconds, and the others take
    them over; joining or leaving rebalances them. ``lease_ttl=None``: no leases, this
    coordinator owns every partition (a single coordinator, as in local mode).
    """

    def __init__(
        self,
        workflows: Iterable[Workflow],
        *,
        transport: Transport,
        prefix: str = "orch",
        partitions: int = 16,
        retention: float = DEFAULT_RETENTION,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        store: Store | None = None,
        system: ActorSystem | None = None,
        log_age: float = DEFAULT_LOG_AGE,
        event_log_bytes: int = DEFAULT_EVENT_LOG_BYTES,
        replicas: int = 1,
        lease_ttl: float | None = DEFAULT_LEASE_TTL,
        ack_wait: float = DEFAULT_ACK_WAIT,
        name: str | None = None,
    ) -> None:
        """``store`` defaults to the key-value store on ``transport``; ``system`` to an actor
        system of its own (LocalEngine shares one between its coordinator and its worker);
        ``log_age``: seconds the event and hook streams keep their messages;
        ``event_log_bytes``: the most the event stream holds, in the servers' memory (events are
        sent at most once, and a third of a workflow's stream writes: on disk, with
        ``sync_interval: always``, they cost more than the transaction's own); ``replicas``:
        copies a NATS cluster keeps of the work queue, the streams and the buckets this
        coordinator creates (existing ones keep theirs); ``ack_wait``: the work queue's
        redelivery time (give workers the same); ``name``: this coordinator's unique name among
        its peers (default: host, process id and a random part)."""
        super().__init__()
        if lease_ttl is not None and not lease_ttl >= 1:
            raise ConfigurationError(f"lease_ttl must be at least 1 second, not {lease_ttl}")
        self.lease_ttl = lease_ttl
        self.ack_wait = ack_wait
        self.name = name or service_id("coordinator")
        self.log_age = log_age
        self.event_log_bytes = event_log_bytes
        self.replicas = replicas
        self._system = system
        self.workflows = collect_workflows(workflows)
        if not self.workflows:
            raise ConfigurationError("a coordinator needs at least one workflow")
        self.graphs = {name: wf.graph for name, wf in self.workflows.items()}
        self.transport = transport
        self.subjects = Subjects(prefix, partitions)
        self.retention = retention
        self.max_payload = max_payload
        self.store: Store = store or KvStore(transport, prefix=prefix, replicas=replicas)
        self.host: CoordinatorHost | None = None
        self.leases: PartitionLeases | None = None

    async def __aenter__(self) -> Coordinator:
        async def setup(stack: contextlib.AsyncExitStack) -> None:
            await self.store.open()
            for name, subjects in self.subjects.logs.items():
                events = name == self.subjects.event_log
                await self.transport.ensure_log(
                    name,
                    subjects,
                    max_age=self.log_age,
                    replicas=self.replicas,
                    memory=events,
                    max_bytes=self.event_log_bytes if events else None,
                )
            system = self._system
            if system is None:
                system = await stack.enter_async_context(ActorSystem())
            host = CoordinatorHost(
                transport=self.transport,
                store=self.store,
                system=system,
                graphs=self.graphs,
                subjects=self.subjects,
                retention=self.retention,
                queue=self.subjects.work_queue_config(
                    ack_wait=self.ack_wait, replicas=self.replicas
                ),
            )
            leases = None
            if self.lease_ttl is not None:
                leases = host.leases = PartitionLeases(
                    self.transport,
                    bucket=f"{self.subjects.names}_leases",
                    partitions=self.subjects.partitions,
                    owner=self.name,
                    on_acquired=host.acquire,
                    on_lost=host.release,
                    ttl=self.lease_ttl,
                )
            await host.start()
            if leases is not None:
                await leases.open()
                system.start_soon(leases.run, name="partition leases")
                # Leaving: hand the partitions over at once (before the actor system stops).
                stack.push_async_callback(leases.release)
            self.leases = leases
            gateway = Gateway(
                transport=self.transport,
                system=system,
                store=self.store,
                graphs=self.graphs,
                subjects=self.subjects,
                route=host.route_start,
                start_here=partial(host.start_here, timeout=_START_HERE_TIMEOUT),
                watch=host.watch,
                max_payload=self.max_payload,
                clock=host.clock,
            )
            await gateway.start()
            self.host = host

        await self._enter(setup)
        return self

    def stats(self) -> dict[str, Any]:
        """Figures for service discovery (``$SRV.STATS``)."""
        host = self.host
        return {
            "workflows": sorted(self.workflows),
            "partitions": [] if self.leases is None else sorted(self.leases.owned),
            "active_transactions": 0 if host is None else len(host.actors),
            "timers": 0 if host is None else len(host.timers),
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
        }


class Worker(_Service):
    """Runs step handlers: ``async with Worker(workflows, transport=t, container=c):``.

    ``steps`` limits the worker to some step names (default: every step of the workflows).
    """

    def __init__(
        self,
        workflows: Iterable[Workflow],
        *,
        transport: Transport,
        container: Any = None,
        steps: Iterable[str] | None = None,
        concurrency: int | None = None,
        prefix: str = "orch",
        partitions: int = 16,
        system: ActorSystem | None = None,
        replicas: int = 1,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_deliver: int = DEFAULT_MAX_DELIVER,
        store: Store | None = None,
    ) -> None:
        """``replicas``: copies a NATS cluster keeps of the work queue, if this worker creates
        it; ``ack_wait``: the work queue's redelivery time (give coordinators the same);
        ``max_deliver``: deliveries of one step attempt (its worker died each time) before the
        step fails for good with ``StepDeliveryError``; ``store``: where the coordinators keep
        the transactions (default: the key-value store on ``transport``), read to drop a step
        command delivered again whose result is already recorded."""
        super().__init__()
        if max_deliver < 1:
            raise ConfigurationError(f"max_deliver must be at least 1, not {max_deliver}")
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.store: Store = store or KvStore(transport, prefix=prefix, replicas=replicas)
        self._system = system
        self.replicas = replicas
        self.workflows = collect_workflows(workflows)
        self.transport = transport
        self.subjects = Subjects(prefix, partitions)
        self.container = as_container(container)
        self.concurrency = concurrency
        table, self.limits = step_table(self.workflows)
        if steps is not None:
            wanted = set(steps)
            unknown = wanted - set(table)
            if unknown:
                raise ConfigurationError(
                    f"unknown step(s) {sorted(unknown)}; the workflows have {sorted(table)}"
                )
            table = {name: defs for name, defs in table.items() if name in wanted}
        self.steps = table
        self.host: ExecutorHost | None = None

    async def __aenter__(self) -> Worker:
        async def setup(stack: contextlib.AsyncExitStack) -> None:
            await self.store.open()
            await self.transport.ensure_queue(
                self.subjects.work_queue_config(ack_wait=self.ack_wait, replicas=self.replicas)
            )
            system = self._system
            if system is None:
                system = await stack.enter_async_context(ActorSystem())
            host = ExecutorHost(
                transport=self.transport,
                system=system,
                steps=self.steps,
                limits=self.limits,
                subjects=self.subjects,
                container=self.container,
                concurrency=self.concurrency,
                ack_wait=self.ack_wait,
                max_deliver=self.max_deliver,
                store=self.store,
            )
            await host.start()
            stack.push_async_callback(host.stop)  # runs before the actor system is left
            self.host = host

        await self._enter(setup)
        return self

    def stats(self) -> dict[str, Any]:
        """Figures for service discovery (``$SRV.STATS``)."""
        return {
            "steps": sorted(self.steps),
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
        }
