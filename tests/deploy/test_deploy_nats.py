"""The shipped ``deploy/nats.conf`` on a real nats-server: each role can do its job, and no more.

Each test starts its own server from ``deploy/nats.conf``, with test passwords in the
environment (the file reads them as ``$VARIABLES``). Only the listen address, the monitoring
port and the store directory are changed for the test (127.0.0.1, a free port, a temporary
directory); everything from the permission blocks on is used byte for byte.

Denied operations are observed the way a client sees them: nats-py hands the server's
``Permissions Violation`` to the connection's error callback, and the message goes nowhere.
Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.micro
import pytest
import yaml
from nats.aio.client import Client as NatsClient

from actors import Subjects
from examples import shop
from orchestrator import TransactionState
from orchestrator._client import Client
from orchestrator.services import Coordinator, Worker
from transport import Msg, NatsServer, NatsTransport, WorkMsg

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DEADLINE = 10.0
"""Seconds any wait here may take before the test fails."""

PASSWORDS = {
    "coordinator": "test-coordinator-pw",
    "worker": "test-worker-pw",
    "client": "test-client-pw",
    "system": "test-system-pw",
}
SERVER_ENV = {
    "ORCH_COORDINATOR_PASSWORD": PASSWORDS["coordinator"],
    "ORCH_WORKER_PASSWORD": PASSWORDS["worker"],
    "ORCH_CLIENT_PASSWORD": PASSWORDS["client"],
    "NATS_SYSTEM_PASSWORD": PASSWORDS["system"],
}
SUBJECTS = Subjects()  # the default prefix, `orch`, which nats.conf is written for
WORK = SUBJECTS.work_queue
PERMISSIONS_MARK = (
    "# ---------------------------------------------------------------------------- permissions"
)


def config_for_test() -> str:
    """``deploy/nats.conf`` with the server-local settings made fit for a test."""
    text = (DEPLOY / "nats.conf").read_text()
    head, mark, permissions = text.partition(PERMISSIONS_MARK)
    assert mark, "nats.conf lost its permissions section marker"
    overrides = {
        r"(?m)^listen: .*$": "listen: 127.0.0.1:4222  # overridden by NatsServer's -a/-p",
        r"(?m)^http: .*$": "# (monitoring off in the test)",
        r"(?m)^  store_dir: .*$": "  # store_dir: given by NatsServer's -sd",
    }
    for pattern, replacement in overrides.items():
        head, count = re.subn(pattern, replacement, head)
        assert count == 1, pattern
    return head + mark + permissions


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    for name, value in SERVER_ENV.items():
        monkeypatch.setenv(name, value)
    with NatsServer(config=config_for_test()) as running:
        yield running


class Errors:
    """A connection's error callback, keeping what the server reported."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._changed = anyio.Event()

    async def callback(self, error: Exception) -> None:
        """For nats-py's ``error_cb`` (which wants a coroutine function)."""
        self.items.append(str(error))
        self._changed.set()

    def violations(self) -> list[str]:
        # The wording varies between server versions ("Permissions Violation for Publish to",
        # "permissions violation for publish to").
        return [e for e in self.items if "permissions violation" in e.lower()]

    async def wait_for_violation(self, what: str) -> str:
        """Wait for the server to report a permissions violation mentioning ``what``."""
        with anyio.fail_after(DEADLINE):
            while True:
                for error in self.violations():
                    if f'"{what.lower()}"' in error.lower():  # some servers lowercase it all
                        return error
                self._changed = anyio.Event()
                await self._changed.wait()


class Received:
    """A subscription handler keeping its messages, awaited with a deadline."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = anyio.Event()

    def __call__(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def on_msg(self, msg: Any) -> None:
        """As a nats-py subscription callback."""
        self(msg)

    async def wait_for(self, count: int) -> list[Any]:
        with anyio.fail_after(DEADLINE):
            while len(self.items) < count:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.items


@contextlib.asynccontextmanager
async def connect(server: NatsServer, role: str, errors: Errors) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection as one of the roles."""
    nc = await nats.connect(
        server.url,
        user=role,
        password=PASSWORDS[role],
        error_cb=errors.callback,
        allow_reconnect=False,
        name=f"test-{role}",
    )
    try:
        yield nc
    finally:
        await nc.close()


def transport(server: NatsServer, role: str, errors: Errors) -> NatsTransport:
    """The orchestrator's own transport, logged in as one of the roles."""
    return NatsTransport(
        server.url,
        name=f"test-{role}",
        user=role,
        password=PASSWORDS[role],
        error_cb=errors.callback,
    )


def server_log_violations(server: NatsServer) -> list[str]:
    return [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if re.search(r"(?i)permissions violation|(publish|subscription) violation", line)
    ]


async def stream_subjects(nc: NatsClient) -> dict[str, int]:
    """Messages per subject in the work queue (read as the coordinator)."""
    info = await nc.jetstream().stream_info(WORK, subjects_filter=">")
    return dict(info.state.subjects or {})


# ------------------------------------------------------------------------------------ tests
def handshake(server: NatsServer, **credentials: str) -> str:
    """Connect with the raw protocol; the server's answer to ``CONNECT`` + ``PING``."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        options = {"verbose": False, "pedantic": False, "protocol": 1, **credentials}
        sock.sendall(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
        return reader.readline().decode().strip()


async def test_every_connection_needs_a_user_and_its_password(server: NatsServer) -> None:
    async def answer(**credentials: str) -> str:
        return await anyio.to_thread.run_sync(lambda: handshake(server, **credentials))

    assert await answer() == "-ERR 'Authorization Violation'"
    assert await answer(user="worker") == "-ERR 'Authorization Violation'"
    assert await answer(user="worker", **{"pass": "wrong"}) == "-ERR 'Authorization Violation'"
    for role in ("coordinator", "worker", "client", "system"):
        assert await answer(user=role, **{"pass": PASSWORDS[role]}) == "PONG", role


async def test_a_worker_can_do_its_job(server: NatsServer) -> None:
    """As the worker: hear aborts on orch.ctl.*, pull step commands, hand results straight to
    the partition's owner or publish them to the partition."""
    coordinator_errors, worker_errors = Errors(), Errors()
    commands, results, direct, aborts = Received(), Received(), Received(), Received()

    async def run_step(work: WorkMsg) -> None:
        commands(work)
        # The result goes to the partition's owner, then (as when it is not taken) to the
        # transaction's partition, as a step executor sends it.
        reply = await wt.request(SUBJECTS.result(0), b"result:" + work.data)
        assert reply.data == b"+"
        await wt.enqueue("orch.tx.0", b"result:" + work.data, msg_id=f"r:{work.data.decode()}")
        await work.ack()

    def take_direct(msg: Msg) -> None:
        direct(msg)
        assert msg.reply is not None
        tasks.start_soon(ct.publish, msg.reply, b"+")  # allowed by allow_responses

    def take_result(work: WorkMsg) -> None:
        results(work)
        tasks.start_soon(work.ack)

    async with (
        transport(server, "coordinator", coordinator_errors) as ct,
        transport(server, "worker", worker_errors) as wt,
        anyio.create_task_group() as tasks,
    ):
        # The coordinator creates the work queue; the worker's own ensure_queue (as a Worker
        # service does on start) finds it as is.
        await ct.ensure_queue(SUBJECTS.work_queue_config())
        await wt.ensure_queue(SUBJECTS.work_queue_config())
        await ct.consume(WORK, "coordinator-tx-0", "orch.tx.0", take_result)
        await ct.subscribe(SUBJECTS.results, take_direct, queue="coordinators")
        await wt.subscribe("orch.ctl.*", aborts)
        await wt.consume(
            WORK, "step-charge", SUBJECTS.step("charge"), lambda w: tasks.start_soon(run_step, w)
        )
        await ct.enqueue(SUBJECTS.step("charge"), b"tx-1", msg_id="tx-1:charge:invoke:1")
        await ct.publish(SUBJECTS.control("charge"), b"abort tx-1")

        (command,) = await commands.wait_for(1)
        assert (command.subject, command.data) == ("orch.step.charge", b"tx-1")
        (handed,) = await direct.wait_for(1)
        assert (handed.subject, handed.data) == ("orch.result.0", b"result:tx-1")
        (result,) = await results.wait_for(1)
        assert (result.subject, result.data) == ("orch.tx.0", b"result:tx-1")
        (abort,) = await aborts.wait_for(1)
        assert isinstance(abort, Msg)
        assert abort.data == b"abort tx-1"

    assert worker_errors.violations() == []
    assert coordinator_errors.violations() == []
    assert server_log_violations(server) == []


async def test_a_worker_cannot_command_steps_or_take_the_coordinators_work(
    server: NatsServer,
) -> None:
    coordinator_errors, worker_errors = Errors(), Errors()
    async with (
        transport(server, "coordinator", coordinator_errors) as ct,
        connect(server, "coordinator", coordinator_errors) as coordinator,
        connect(server, "worker", worker_errors) as worker,
    ):
        await ct.ensure_queue(SUBJECTS.work_queue_config())
        await worker.publish("orch.step.charge", b"forged command")
        await worker_errors.wait_for_violation("orch.step.charge")
        await worker.publish("orch.start.checkout", b"{}")
        await worker_errors.wait_for_violation("orch.start.checkout")
        for durable in ("coordinator-tx-0", "coordinator-tx-15", "gateway-start"):
            pull = f"$JS.API.CONSUMER.MSG.NEXT.{WORK}.{durable}"
            await worker.publish(pull, b'{"batch": 1}', reply=worker.new_inbox())
            await worker_errors.wait_for_violation(pull)
        await worker.publish("$KV.orch_tx.forged", b"state")
        await worker_errors.wait_for_violation("$KV.orch_tx.forged")
        await worker.subscribe("orch.api.*", queue="orch-gateway")
        await worker_errors.wait_for_violation("orch.api.*")
        # Nothing got into the work queue (the refused publishes came before the last refusal).
        assert await stream_subjects(coordinator) == {}

    assert coordinator_errors.violations() == []


async def test_a_client_cannot_publish_step_commands(server: NatsServer) -> None:
    """As the client: orch.step.* (and orch.tx.*, orch.result.*, orch.ctl.*) are refused and
    go nowhere."""
    coordinator_errors, worker_errors, client_errors = Errors(), Errors(), Errors()
    aborts = Received()
    async with (
        transport(server, "coordinator", coordinator_errors) as ct,
        connect(server, "worker", worker_errors) as worker,
        connect(server, "coordinator", coordinator_errors) as coordinator,
        connect(server, "client", client_errors) as client,
    ):
        await ct.ensure_queue(SUBJECTS.work_queue_config())
        # Subscribers for what the client will try: the work queue (a JetStream stream takes
        # orch.step.* and orch.tx.*), a worker listening for aborts on orch.ctl.* and a
        # coordinator taking results on orch.result.*.
        await worker.subscribe("orch.ctl.*", cb=aborts.on_msg)
        await worker.flush()
        await coordinator.subscribe("orch.result.*", queue="coordinators", cb=aborts.on_msg)
        await coordinator.flush()

        for subject in ("orch.step.x", "orch.tx.0", "orch.result.0", "orch.ctl.x"):
            await client.publish(subject, b"forged")
            await client_errors.wait_for_violation(subject)
        # What the client may do, on the same connection, after the refused ones: its
        # acknowledgement means the server has handled everything sent before.
        ack = await client.jetstream().publish("orch.start.checkout", b'{"input": {}}')
        assert ack.stream == WORK

        assert await stream_subjects(coordinator) == {"orch.start.checkout": 1}
        await worker.flush()  # anything routed to the worker would have arrived by now
        assert aborts.items == []

    assert worker_errors.items == []
    assert coordinator_errors.violations() == []
    violations = server_log_violations(server)
    assert len(violations) == 4, violations
    assert all("user:client" in line for line in violations), violations


async def test_a_client_talks_to_the_api_but_not_to_jetstream(server: NatsServer) -> None:
    coordinator_errors, client_errors = Errors(), Errors()
    requests = Received()

    async def answer(msg: Any) -> None:
        requests(msg)
        await msg.respond(b'{"ok": true}')  # allowed by allow_responses, not by _INBOX.>

    async with (
        connect(server, "coordinator", coordinator_errors) as coordinator,
        connect(server, "client", client_errors) as client,
    ):
        # The API is served only in the coordinators' queue group.
        await coordinator.subscribe("orch.api.*")
        await coordinator_errors.wait_for_violation("orch.api.*")
        await coordinator.subscribe("orch.api.*", queue="orch-gateway", cb=answer)
        await coordinator.flush()

        reply = await client.request("orch.api.get", b"{}", timeout=DEADLINE)
        assert json.loads(reply.data) == {"ok": True}
        (request,) = await requests.wait_for(1)
        assert request.subject == "orch.api.get"

        # Events and hooks may be heard; API requests, the work queue and buckets may not.
        await client.subscribe("orch.evt.>")
        await client.subscribe("orch.hook.>")
        await client.flush()
        for pattern in ("orch.api.*", "orch.step.>", "$KV.orch_tx.>"):
            await client.subscribe(pattern)
            await client_errors.wait_for_violation(pattern)
        for subject in (f"$JS.API.STREAM.INFO.{WORK}", "$KV.orch_tx.some-key", "_INBOX.x.y"):
            await client.publish(subject, b"")
            await client_errors.wait_for_violation(subject)
        assert len(client_errors.violations()) == 6

    (violation,) = coordinator_errors.violations()
    assert violation.lower() == 'nats: permissions violation for subscription to "orch.api.*"'


async def test_the_services_run_the_example_with_their_own_users(server: NatsServer) -> None:
    """Coordinator, worker and client services, each as its role: a checkout that succeeds
    and one that is compensated, with no permission refused along the way."""
    errors = {role: Errors() for role in ("coordinator", "worker", "client")}
    with anyio.fail_after(3 * DEADLINE):
        async with (
            transport(server, "coordinator", errors["coordinator"]) as ct,
            transport(server, "worker", errors["worker"]) as wt,
            Coordinator([shop.checkout], transport=ct),
            Worker([shop.checkout], transport=wt, container=shop.make_container()),
            Client(transport(server, "client", errors["client"])) as client,
        ):
            items = [{"sku": "book", "qty": 2}]
            done = await client.run("checkout", {"customer": "ada@example.com", "items": items})
            assert done.state is TransactionState.DONE
            reverted = await client.run(
                "checkout",
                {"customer": "ada@example.com", "items": items, "fail_at": "create-order"},
                throw_on_error=False,
            )
            assert reverted.state is TransactionState.REVERTED
            listed = {r.transaction_id for r in await client.list()}
            assert {done.transaction_id, reverted.transaction_id} <= listed
    for role, seen in errors.items():
        assert seen.violations() == [], role
    assert server_log_violations(server) == []


# ------------------------------------------------------------- the services as compose runs them
def compose_services() -> dict[str, Any]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return {name: compose["services"][name] for name in ("coordinator", "worker")}


def service_env(server: NatsServer, service: dict[str, Any]) -> dict[str, str]:
    """The service's compose environment, pointed at the test server with the test password
    (one server here, not the compose file's three nodes: so one replica)."""
    env = {k: str(v) for k, v in service["environment"].items()}
    role = env["ORCH_USER"]
    assert env["ORCH_REPLICAS"] == "3"
    env.update(ORCH_SERVERS=server.url, ORCH_PASSWORD=PASSWORDS[role], ORCH_REPLICAS="1")
    return {**os.environ, **env}


def run_healthcheck(test: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A compose healthcheck (``["CMD", "python", "/app/healthcheck.py", ...]``), run here."""
    assert test[:3] == ["CMD", "python", "/app/healthcheck.py"], test
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), *test[3:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextlib.contextmanager
def processes(
    commands: dict[str, tuple[list[str], dict[str, str]]], logs: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start the commands; on the way out, stop (SIGTERM, then SIGKILL) what still runs."""
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (command, env) in commands.items():
            with open(logs / f"{name}.log", "wb") as log:
                running[name] = subprocess.Popen(
                    command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
        yield running
    finally:
        for process in running.values():
            if process.poll() is None:
                process.terminate()
        for process in running.values():
            try:
                process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(DEADLINE)


async def test_the_compose_services_run_with_their_users_and_pass_their_healthchecks(
    server: NatsServer, tmp_path: Path
) -> None:
    """The coordinator and worker commands of docker-compose.yml, with their environment and
    users, as processes; their healthchecks pass; a client runs the example through them; they
    stop cleanly on SIGTERM; the server refused nothing."""
    services = compose_services()
    commands = {
        name: ([*orchestrator_command(), *service["command"]], service_env(server, service))
        for name, service in services.items()
    }
    with processes(commands, tmp_path) as running:

        def logs() -> str:
            return "\n".join(
                f"--- {name}:\n{(tmp_path / f'{name}.log').read_text(errors='replace')[-3000:]}"
                for name in running
            )

        for name, service in services.items():
            env = commands[name][1]
            with anyio.fail_after(3 * DEADLINE):
                while True:  # the healthcheck, until it passes (as compose retries it)
                    result = await anyio.to_thread.run_sync(
                        run_healthcheck, service["healthcheck"]["test"], env
                    )
                    if result.returncode == 0:
                        break
                    assert running[name].poll() is None, f"{name} exited\n{logs()}"
        errors = Errors()
        async with Client(transport(server, "client", errors)) as client:
            items = [{"sku": "book", "qty": 1}]
            with anyio.fail_after(3 * DEADLINE):
                done = await client.run("checkout", {"customer": "ada@example.com", "items": items})
                reverted = await client.run(
                    "checkout", {"items": items, "fail_at": "charge-payment"}, throw_on_error=False
                )
            assert done.state is TransactionState.DONE, logs()
            assert reverted.state is TransactionState.REVERTED, logs()
        for process in running.values():
            process.terminate()
        for name, process in running.items():
            code = await anyio.to_thread.run_sync(process.wait, DEADLINE)
            assert code == 0, f"{name} exited with {code} on SIGTERM\n{logs()}"
    assert errors.violations() == []
    assert server_log_violations(server) == [], logs()


def orchestrator_command() -> list[str]:
    script = Path(sys.executable).parent / "orchestrator"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orchestrator.cli"]


# ---------------------------------------------------------------------- the health check
def healthcheck(server: NatsServer, role: str, service: str, password: str | None = None) -> Any:
    env = {
        **os.environ,
        "ORCH_SERVERS": f"nats://127.0.0.1:1,{server.url}",  # a dead one first: fails over
        "ORCH_USER": role,
        "ORCH_PASSWORD": password or PASSWORDS[role],
    }
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), service, "--timeout", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_the_health_check_pings_the_service_with_the_role_credentials(
    server: NatsServer,
) -> None:
    errors = Errors()
    async with connect(server, "worker", errors) as worker:
        service = await nats.micro.add_service(worker, name="orch-worker", version="0.1.0")
        try:
            await worker.flush()
            ok = await anyio.to_thread.run_sync(healthcheck, server, "worker", "orch-worker")
            assert ok.returncode == 0, ok.stderr
            assert "healthy: orch-worker instance" in ok.stdout
            nobody = await anyio.to_thread.run_sync(
                healthcheck, server, "coordinator", "orch-coordinator"
            )
            assert nobody.returncode == 1, nobody.stderr
            assert "no instance of 'orch-coordinator'" in nobody.stderr
            refused = await anyio.to_thread.run_sync(
                healthcheck, server, "worker", "orch-worker", "wrong-password"
            )
            assert refused.returncode == 2, refused.stderr
        finally:
            await service.stop()
    assert errors.violations() == []
