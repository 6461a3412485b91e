"""The distributed services: coordinators and workers, on any transport (NATS in production).

``Coordinator`` runs the gateway (public start and API subjects) and the coordinator actors,
keeping transactions in the key-value store; ``Worker`` runs step executors. Both take a
connected transport and the workflows they serve; neither keeps a global registry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from actors import (
    ActorSystem,
    CoordinatorHost,
    ExecutorHost,
    Gateway,
    KvStore,
    Store,
    Subjects,
)
from actors._gateway import DEFAULT_MAX_PAYLOAD
from transport import Transport

from ._composer import Workflow
from ._errors import ConfigurationError
from ._step import Step, as_container

__all__ = [
    "DEFAULT_LOG_AGE",
    "DEFAULT_RETENTION",
    "Coordinator",
    "Worker",
    "collect_workflows",
    "step_table",
]

DEFAULT_RETENTION = 86400.0
"""Seconds a finished transaction is kept (for idempotent re-runs and ``get``): one day."""

DEFAULT_LOG_AGE = 86400.0
"""Seconds lifecycle events and hook payloads are kept in their streams: one day."""


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

    It owns every partition (partition leases and failover between coordinators come with the
    fault-tolerance work).
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
        replicas: int = 1,
    ) -> None:
        """``store`` defaults to the key-value store on ``transport``; ``system`` to an actor
        system of its own (LocalEngine shares one between its coordinator and its worker);
        ``log_age``: seconds the event and hook streams keep their messages; ``replicas``:
        copies a NATS cluster keeps of the work queue, the streams and the buckets this
        coordinator creates (existing ones keep theirs)."""
        super().__init__()
        self.log_age = log_age
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

    async def __aenter__(self) -> Coordinator:
        async def setup(stack: contextlib.AsyncExitStack) -> None:
            await self.store.open()
            for name, subjects in self.subjects.logs.items():
                await self.transport.ensure_log(
                    name, subjects, max_age=self.log_age, replicas=self.replicas
                )
            await self.transport.ensure_queue(
                self.subjects.work_queue_config(replicas=self.replicas)
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
            )
            await host.start()
            gateway = Gateway(
                transport=self.transport,
                system=system,
                store=self.store,
                graphs=self.graphs,
                subjects=self.subjects,
                route=host.route,
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
    ) -> None:
        """``replicas``: copies a NATS cluster keeps of the work queue, if this worker creates
        it."""
        super().__init__()
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
            await self.transport.ensure_queue(
                self.subjects.work_queue_config(replicas=self.replicas)
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
