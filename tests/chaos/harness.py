"""The chaos run: services in their own processes, killed and restarted while workflows run.

It starts a nats-server (file storage, ``sync_interval: always``), or a three-node cluster on
loopback with ``--cluster``, two coordinator and three worker processes (``app.py``), submits
the workflows through a client at a bounded rate, and meanwhile kills (SIGKILL) a random worker
every ~2 s, a coordinator every ~5 s and the nats-server (or one cluster node) a few times,
restarting each at once. Then it waits until every transaction is final (or a deadline), waits
for the services to settle (the work queue empty, no live transaction; again under a deadline),
reads the sizes of the streams and buckets, and runs the checks of ``check.py`` over the ledger,
the final states, the model and those sizes::

    python -m tests.chaos.harness --workflows 2000 --duration 120 [--cluster]

Everything listens on 127.0.0.1; every child process is killed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import nats
from anyio.abc import Process, TaskGroup
from anyio.streams.text import TextReceiveStream

from actors import Subjects
from orchestrator import TransactionNotFoundError, WorkflowResult, connect
from orchestrator._client import Client
from transport import KeyValue, NatsServer, NatsTransport

from .app import open_ledger
from .check import (
    Plan,
    Report,
    Resources,
    StreamSize,
    check_run,
    make_plan,
    nested_ids,
    read_ledger,
)

APP = Path(__file__).with_name("app.py")
PREFIX = "chaos"
JETSTREAM = "jetstream {\n  sync_interval: always\n}\n"
"""File storage (the launcher's ``-sd``) synced on every write, as the shipped nats.conf."""

CONNECTION: dict[str, Any] = {
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.25,
    "connect_timeout": 2,
}
"""The client's NATS connection: keep reconnecting while the server is down."""


@dataclass
class ChaosConfig:
    workflows: int = 2000
    duration: float = 120.0
    """Seconds of faults at least (they go on while workflows are still being submitted)."""
    rate: float | None = None
    """Workflows started per second (default: all of them in 80% of ``duration``)."""
    concurrency: int = 16
    """Start requests in flight at once."""
    coordinators: int = 2
    workers: int = 3
    worker_kill_every: float = 2.0
    coordinator_kill_every: float = 5.0
    nats_kills: int = 2
    """Kills (and restarts) of the nats-server, or of one node of the cluster."""
    cluster: bool = False
    partitions: int = 16
    seed: int = 1
    settle_timeout: float = 120.0
    """Seconds to wait, after the faults, for every transaction to be final."""
    start_timeout: float = 60.0
    """Seconds one start may take, retries included (the server may be down)."""
    ack_wait: float | None = 3.0
    """The work queue's ack_wait, the same for coordinators and workers (None: the services'
    default); short, so a killed worker's step commands come back quickly."""
    lease_ttl: float | None = 2.0
    """The coordinators' partition lease ttl (None: their default); short, for quick failover."""
    max_deliver: int | None = None
    """Workers: deliveries of one step attempt before it fails for good (None: their default)."""
    resource_timeout: float = 60.0
    """Seconds to wait, once every transaction is final, for the services to settle before the
    streams and buckets are measured."""
    workdir: Path | None = None
    """Where the ledger and logs go (default: a temporary directory, removed afterwards)."""
    p_fail: float = 0.2
    p_flaky: float = 0.15
    p_comp_flaky: float = 0.05


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- nats-servers --------------------------------------------------------------------------


class NatsCluster:
    """Three nats-servers clustered on loopback (JetStream on each, its own store), each one
    a :class:`NatsServer` with a config naming the server and its routes to the others."""

    def __init__(self, size: int = 3, name: str = "chaos") -> None:
        ports = [_free_port() for _ in range(size)]
        self.servers: list[NatsServer] = []
        for i, port in enumerate(ports):
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in ports if p != port)
            config = (
                f"server_name: {name}-{i}\n"
                f"{JETSTREAM}"
                f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{port}\n"
                f"  routes: [{routes}]\n}}\n"
            )
            self.servers.append(NatsServer(config=config, start_timeout=20))

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def __enter__(self) -> NatsCluster:
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.__exit__(None, None, None)


async def wait_for_jetstream(urls: list[str], replicas: int, timeout: float = 60.0) -> None:
    """Wait until JetStream can create a stream with ``replicas`` copies (a cluster has elected
    its leader and knows its peers)."""
    nc = await nats.connect(urls, **CONNECTION)
    try:
        js = nc.jetstream()
        name = f"CHAOS_PROBE_{random.randrange(1 << 30)}"
        with anyio.fail_after(timeout):
            while True:
                try:
                    await js.add_stream(
                        name=name, subjects=[f"probe.{name}"], num_replicas=replicas
                    )
                    await js.delete_stream(name)
                    return
                except Exception:  # not ready yet: no leader, not enough peers, ...
                    await anyio.sleep(0.5)
    finally:
        await nc.close()


async def stream_replicas(urls: list[str], names: list[str]) -> dict[str, int | None]:
    """The replicas each stream has (to show the cluster run used three)."""
    nc = await nats.connect(urls, **CONNECTION)
    found: dict[str, int | None] = {}
    try:
        js = nc.jetstream()
        for name in names:
            try:
                found[name] = (await js.stream_info(name)).config.num_replicas
            except Exception:
                found[name] = None
    finally:
        await nc.close()
    return found


# --- the streams and buckets at the end ------------------------------------------------------


async def measure_resources(
    urls: list[str], *, partitions: int, members: int, timeout: float
) -> Resources:
    """The streams and buckets of ``PREFIX`` once the services have settled: poll (under
    ``timeout``) until the work queue is empty, no live transaction is left and the leases
    bucket holds no more than a key per partition and member (a killed coordinator's keys
    expire after the lease ttl), then read the done bucket too."""
    subjects = Subjects(PREFIX, partitions)
    names = subjects.names
    events, hooks = subjects.logs
    buckets = {"live": f"{names}_tx", "done": f"{names}_done", "leases": f"{names}_leases"}
    resources = Resources(
        work=subjects.work_queue,
        events=events,
        hooks=hooks,
        live=f"KV_{buckets['live']}",
        done=f"KV_{buckets['done']}",
        leases=f"KV_{buckets['leases']}",
        partitions=partitions,
        members=members,
    )
    began = time.monotonic()
    async with NatsTransport(urls, name="chaos-inspector", **CONNECTION) as transport:
        js = transport.nats_client.jetstream()
        kv: dict[str, KeyValue] = {}

        async def size(stream: str, bucket: str | None = None) -> StreamSize:
            info = await js.stream_info(stream)
            config, state = info.config, info.state
            keys: list[str] | None = None
            if bucket is not None:
                if bucket not in kv:
                    kv[bucket] = await transport.open_kv(bucket)  # as the services open it
                keys = sorted(await kv[bucket].keys())
            retention = config.retention
            return StreamSize(
                name=stream,
                retention=str(getattr(retention, "value", retention)),
                messages=state.messages,
                bytes=state.bytes,
                max_age=config.max_age or 0.0,
                max_msgs_per_subject=config.max_msgs_per_subject,
                allow_msg_ttl=bool(config.allow_msg_ttl),
                live_keys=None if keys is None else len(keys),
                some_keys=tuple((keys or [])[:3]),
            )

        async def read_all() -> dict[str, StreamSize]:
            found = {
                resources.work: await size(resources.work),
                events: await size(events),
                hooks: await size(hooks),
            }
            for bucket in buckets.values():
                found[f"KV_{bucket}"] = await size(f"KV_{bucket}", bucket)
            return found

        def settled(found: dict[str, StreamSize]) -> bool:
            leases = found[resources.leases].live_keys or 0
            return (
                found[resources.work].messages == 0
                and found[resources.live].live_keys == 0
                and leases <= partitions + members
            )

        last_error = None
        with anyio.move_on_after(timeout):
            for _ in range(int(timeout * 10) + 10):  # bounded in count too
                try:
                    resources.streams = await read_all()
                    last_error = None
                    if settled(resources.streams):
                        resources.settled = True
                        break
                except Exception as exc:  # the server is slow or a cluster node still catching up
                    last_error = f"{type(exc).__name__}: {exc}"
                await anyio.sleep(0.5)  # polling a condition, under the deadline above
        resources.waited = time.monotonic() - began
        if last_error is not None:
            resources.errors.append(last_error)
        with anyio.move_on_after(30):
            try:
                resources.done_keys = await kv[buckets["done"]].keys()
                for key in sorted(resources.done_keys)[:20]:  # a sample: each entry's own ttl
                    raw = await js.get_msg(
                        resources.done, subject=f"$KV.{buckets['done']}.{key}", direct=True
                    )
                    resources.done_ttls[key] = (raw.headers or {}).get("Nats-TTL")
            except Exception as exc:
                resources.errors.append(f"reading the done bucket: {type(exc).__name__}: {exc}")
    return resources


# --- service processes ---------------------------------------------------------------------


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")


class Service:
    """One coordinator or worker process, restartable; its output goes to a log file."""

    def __init__(self, role: str, index: int, args: list[str], logs: Path) -> None:
        self.role = role
        self.index = index
        self.args = args
        self.logs = logs
        self.generation = 0
        self.proc: Process | None = None
        self.restarting = False
        self.idle = anyio.Event()
        self.idle.set()
        self.failed_restarts = 0
        self._log: IO[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    async def start(self, tg: TaskGroup, timeout: float = 60.0, attempts: int = 5) -> None:
        """Start the process and wait until it prints ``ready`` (again if it dies first)."""
        for _ in range(attempts):
            self.generation += 1
            self._close_log()
            self._log = _open_log(self.logs / f"{self.name}.{self.generation}.log")
            command = [sys.executable, str(APP), self.role, *self.args]
            proc = await anyio.open_process(command, stdout=-1, stderr=self._log)
            self.proc = proc
            assert proc.stdout is not None
            stream = TextReceiveStream(proc.stdout)
            ready = False
            with anyio.move_on_after(timeout):
                async for text in stream:
                    if "ready" in text:
                        ready = True
                        break
            if ready:
                tg.start_soon(self._drain, stream)
                return
            await self.kill()
        raise RuntimeError(f"{self.name} did not get ready in {attempts} tries (see its logs)")

    @staticmethod
    async def _drain(stream: TextReceiveStream) -> None:
        with contextlib.suppress(Exception):
            async for _ in stream:
                pass

    async def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if proc is not None:
            with anyio.move_on_after(10, shield=True):
                await proc.aclose()  # waits for it and closes its pipes
            self.proc = None
        self._close_log()

    async def restart(self, tg: TaskGroup) -> None:
        self.restarting = True
        self.idle = anyio.Event()
        try:
            await self.kill()
            await self.start(tg)
        except Exception:  # counted and reported; the run goes on without it
            self.failed_restarts += 1
        finally:
            self.restarting = False
            self.idle.set()

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()


# --- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    config: ChaosConfig
    workdir: Path
    urls: list[str]
    kill_nats: Any
    plans: dict[str, Plan] = field(default_factory=dict)
    submitted: dict[str, float] = field(default_factory=dict)
    start_failures: dict[str, str] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)
    coordinator_kills: list[float] = field(default_factory=list)
    """Wall-clock times of the coordinator kills."""
    services: list[Service] = field(default_factory=list)


def _pause(rng: random.Random, every: float) -> float:
    return every * rng.uniform(0.75, 1.25)


async def _submit(run: Run, client: Client) -> None:
    config = run.config
    rate = config.rate or config.workflows / max(1.0, 0.8 * config.duration)
    limiter = anyio.CapacityLimiter(config.concurrency)
    began = time.monotonic()

    async def start(tx: str, plan: Plan) -> None:
        async with limiter:
            last = "no attempt"
            with anyio.move_on_after(config.start_timeout):
                for attempt in range(1, 1000):
                    try:
                        await client.start(
                            plan.workflow,
                            plan.input(),
                            transaction_id=tx,
                            context=plan.context(),
                        )
                        run.submitted[tx] = time.time()
                        return
                    except Exception as exc:  # the server or the coordinators are down: retry
                        last = f"{type(exc).__name__}: {exc}"
                        await anyio.sleep(min(2.0, 0.1 * attempt))
            run.start_failures[tx] = last

    async with anyio.create_task_group() as tg:
        for i, (tx, plan) in enumerate(run.plans.items()):
            await anyio.sleep(max(0.0, began + i / rate - time.monotonic()))  # the pacing
            tg.start_soon(start, tx, plan)


async def _faults(run: Run, tg: TaskGroup, stop: anyio.Event, began: float) -> None:
    config = run.config
    rng = random.Random(config.seed + 1)
    workers = [s for s in run.services if s.role == "worker"]
    coordinators = [s for s in run.services if s.role == "coordinator"]
    cap = int(config.duration * 10) + 100  # every loop bounded in count too

    async def kill_every(kind: str, pool: list[Service], every: float) -> None:
        for _ in range(cap):
            with anyio.move_on_after(_pause(rng, every)):  # the schedule, not a wait
                await stop.wait()
            if stop.is_set():
                return
            candidates = [s for s in pool if not s.restarting]
            if not candidates:
                continue
            victim = rng.choice(candidates)
            victim.restarting = True
            run.kills[kind] += 1
            if kind == "coordinator":
                run.coordinator_kills.append(time.time())
            tg.start_soon(victim.restart, tg)

    async def kill_nats() -> None:
        for i in range(config.nats_kills):
            at = began + config.duration * (i + 1) / (config.nats_kills + 1)
            with anyio.move_on_after(max(0.0, at - time.monotonic())):  # the schedule
                await stop.wait()
            if stop.is_set():
                return
            run.kills["nats-server"] += 1
            await anyio.to_thread.run_sync(run.kill_nats, rng)

    async with anyio.create_task_group() as faults:
        faults.start_soon(kill_every, "worker", workers, config.worker_kill_every)
        faults.start_soon(kill_every, "coordinator", coordinators, config.coordinator_kill_every)
        faults.start_soon(kill_nats)


async def _final_states(
    run: Run, client: Client, deadline: float, ledger: Path
) -> dict[str, WorkflowResult | None]:
    """Poll the transactions' states until all are final or the deadline passes: the started
    ones, then the nested ones (those the model says they ran, and any other the ledger
    names), which are final before their parents (a parent's nested step ends when its child
    does, and so does its compensation)."""
    finals = await _poll(client, set(run.plans), set(run.submitted), deadline)
    nested = set(nested_ids(run.plans)) | (set(read_ledger(ledger).attempts) - set(run.plans))
    # the nested ones get a deadline of their own: should a child never have been started
    # (the check then says so), the wait is bounded
    finals.update(await _poll(client, nested, nested, min(deadline, time.monotonic() + 15)))
    return finals


async def _poll(
    client: Client, ids: set[str], pending: set[str], deadline: float
) -> dict[str, WorkflowResult | None]:
    """The states of ``ids``, polled until those ``pending`` are final or the deadline
    passes."""
    finals: dict[str, WorkflowResult | None] = dict.fromkeys(ids)
    pending = set(pending)
    limiter = anyio.CapacityLimiter(32)

    async def read(tx: str) -> None:
        async with limiter:
            try:
                result = await client.get(tx)
            except TransactionNotFoundError:
                return
            except Exception:  # a request timed out: next round
                return
            finals[tx] = result
            if result.state.finished:
                pending.discard(tx)

    for _ in range(100_000):
        async with anyio.create_task_group() as tg:
            for tx in sorted(pending):
                tg.start_soon(read, tx)
        if not pending or time.monotonic() > deadline:
            break
        await anyio.sleep(1.0)  # polling under a deadline: the end of a chaos run
    return finals


async def run_chaos(config: ChaosConfig) -> Report:
    """One chaos run; the report says what every check found (it raises only on set-up)."""
    with contextlib.ExitStack() as stack:
        workdir = config.workdir
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
            stack.callback(shutil.rmtree, workdir, True)
        workdir.mkdir(parents=True, exist_ok=True)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        replicas = 3 if config.cluster else 1
        if config.cluster:
            cluster = stack.enter_context(NatsCluster())
            urls = cluster.urls

            def kill_nats(rng: random.Random) -> None:
                server = rng.choice(cluster.servers)
                server.kill()
                server.start()

        else:
            server = stack.enter_context(NatsServer(config=JETSTREAM, start_timeout=30))
            urls = [server.url]

            def kill_nats(rng: random.Random) -> None:
                server.kill()
                server.start()

        run = Run(config, workdir, urls, kill_nats)
        return await _run(run, replicas)
    raise AssertionError("unreachable")


async def _run(run: Run, replicas: int) -> Report:
    config = run.config
    await wait_for_jetstream(run.urls, replicas)
    ledger = run.workdir / "ledger.sqlite"
    open_ledger(str(ledger)).close()
    rng = random.Random(config.seed)
    for i in range(config.workflows):
        tx = f"chaos-{config.seed}-{i}"
        run.plans[tx] = make_plan(
            rng, tx, p_fail=config.p_fail, p_flaky=config.p_flaky, p_comp_flaky=config.p_comp_flaky
        )
    common = ["--nats", ",".join(run.urls), "--prefix", PREFIX, "--ledger", str(ledger)]
    common += ["--partitions", str(config.partitions)]
    if replicas > 1:
        common += ["--replicas", str(replicas)]
    if config.ack_wait is not None:
        common += ["--ack-wait", str(config.ack_wait)]
    coordinator_args = list(common)
    if config.lease_ttl is not None:
        coordinator_args += ["--lease-ttl", str(config.lease_ttl)]
    worker_args = list(common)
    if config.max_deliver is not None:
        worker_args += ["--max-deliver", str(config.max_deliver)]
    for i in range(config.coordinators):
        run.services.append(Service("coordinator", i, coordinator_args, run.workdir / "logs"))
    for i in range(config.workers):
        run.services.append(Service("worker", i, worker_args, run.workdir / "logs"))

    figures: dict[str, Any] = {}
    try:
        async with anyio.create_task_group() as tg:
            async with contextlib.AsyncExitStack() as services:
                services.push_async_callback(_kill_all, run.services)
                for service in run.services:
                    await service.start(tg)
                client = connect(
                    run.urls,
                    prefix=PREFIX,
                    partitions=config.partitions,
                    request_timeout=5.0,
                    **CONNECTION,
                )
                async with client:
                    began = time.monotonic()
                    wall_began = time.time()
                    stop = anyio.Event()
                    async with anyio.create_task_group() as phase:
                        phase.start_soon(_faults, run, tg, stop, began)
                        await _submit(run, client)
                        # faults go on for `duration` at least
                        await anyio.sleep(max(0.0, began + config.duration - time.monotonic()))
                        stop.set()
                    faults_ended = time.monotonic()
                    wall_faults_ended = time.time()
                    # every service is up again before the settling
                    with anyio.fail_after(120):
                        for service in run.services:
                            await service.idle.wait()
                    finals = await _final_states(
                        run, client, time.monotonic() + config.settle_timeout, ledger
                    )
                    settled = time.monotonic()
                    resources = await measure_resources(
                        run.urls,
                        partitions=config.partitions,
                        members=config.coordinators,
                        timeout=config.resource_timeout,
                    )
                    if replicas > 1:
                        names = [f"{PREFIX.upper()}_WORK", f"KV_{PREFIX}_tx", f"KV_{PREFIX}_done"]
                        figures["stream replicas"] = await stream_replicas(run.urls, names)
            tg.cancel_scope.cancel()
    finally:
        await _kill_all(run.services)

    fault_window = faults_ended - began
    started = [finals.get(tx) for tx in run.plans]  # the nested ones left out
    finished = [r.finished_at for r in started if r is not None and r.state.finished]
    under_faults = sum(1 for t in finished if t is not None and t <= wall_faults_ended)
    last = max((t for t in finished if t is not None), default=wall_began)
    figures.update(
        {
            "cluster": "3 nodes, replicas 3" if config.cluster else "1 node",
            "submitted / start failures": f"{len(run.submitted)} / {len(run.start_failures)}",
            "fault phase (s)": round(fault_window, 1),
            "settling (s)": round(settled - faults_ended, 1),
            "kills": dict(sorted(run.kills.items())),
            "failed restarts": sum(s.failed_restarts for s in run.services),
            "throughput under faults (tx/s)": round(under_faults / max(fault_window, 1e-9), 1),
            "throughput overall (tx/s)": round(len(finished) / max(last - wall_began, 1e-9), 1),
        }
    )
    figures.update(_nested_figures(run, finals, config.partitions))
    if run.start_failures:
        tx, why = next(iter(run.start_failures.items()))
        figures["first start failure"] = f"{tx}: {why}"
    return check_run(run.plans, finals, read_ledger(ledger), figures, resources)


def _nested_figures(
    run: Run, finals: dict[str, WorkflowResult | None], partitions: int
) -> dict[str, Any]:
    """How much the nesting was exposed to the coordinator kills: the nested transactions in
    another partition than their parent's (so often on the other coordinator), and those live
    when a coordinator was killed (created, not yet finished)."""
    subjects = Subjects(PREFIX, partitions)
    nested = [(tx, r) for tx, r in finals.items() if tx not in run.plans and r is not None]
    elsewhere = sum(
        1 for tx, _ in nested if subjects.partition(tx) != subjects.partition(tx.split(":", 1)[0])
    )
    live = 0
    for _, r in nested:
        if r.created_at is None:
            continue
        end = r.finished_at if r.finished_at is not None else float("inf")
        live += any(r.created_at <= t <= end for t in run.coordinator_kills)
    return {
        "nested: in another partition than the parent": f"{elsewhere} of {len(nested)}",
        "nested: live across a coordinator kill": live,
    }


async def _kill_all(services: list[Service]) -> None:
    with anyio.CancelScope(shield=True):
        for service in services:
            await service.kill()


def parse(argv: list[str]) -> ChaosConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = ChaosConfig()
    parser.add_argument("--workflows", type=int, default=defaults.workflows)
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--coordinators", type=int, default=defaults.coordinators)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--nats-kills", type=int, default=defaults.nats_kills)
    parser.add_argument("--worker-kill-every", type=float, default=defaults.worker_kill_every)
    parser.add_argument(
        "--coordinator-kill-every", type=float, default=defaults.coordinator_kill_every
    )
    parser.add_argument("--cluster", action="store_true")
    parser.add_argument("--partitions", type=int, default=defaults.partitions)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--settle-timeout", type=float, default=defaults.settle_timeout)
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=defaults.ack_wait,
        help="work-queue ack_wait of coordinators and workers (s); 0: the services' default",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=defaults.lease_ttl,
        help="the coordinators' partition lease ttl (s); 0: the services' default",
    )
    parser.add_argument(
        "--max-deliver",
        type=int,
        default=defaults.max_deliver,
        help="workers: deliveries of one step attempt before it fails for good",
    )
    parser.add_argument("--resource-timeout", type=float, default=defaults.resource_timeout)
    parser.add_argument("--workdir", type=Path, default=None, help="keep ledger and logs here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    return ChaosConfig(
        workflows=args.workflows,
        duration=args.duration,
        rate=args.rate,
        concurrency=args.concurrency,
        coordinators=args.coordinators,
        workers=args.workers,
        nats_kills=args.nats_kills,
        worker_kill_every=args.worker_kill_every,
        coordinator_kill_every=args.coordinator_kill_every,
        cluster=args.cluster,
        partitions=args.partitions,
        seed=args.seed,
        settle_timeout=args.settle_timeout,
        ack_wait=args.ack_wait or None,
        lease_ttl=args.lease_ttl or None,
        max_deliver=args.max_deliver,
        resource_timeout=args.resource_timeout,
        workdir=args.workdir,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse(sys.argv[1:] if argv is None else argv)
    report = anyio.run(run_chaos, config)
    print(report.render())
    if "--json" in (sys.argv[1:] if argv is None else argv):
        print(json.dumps(report.figures, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
