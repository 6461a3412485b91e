"""The service commands as real processes on a real nats-server, and the client commands.

``coordinator``, ``worker``, ``up``, ``watch`` and ``hooks`` run as subprocesses (the services
until SIGTERM, the followers until SIGINT); the one-shot client commands run in this process
through typer's runner. Readiness is NATS service discovery (``$SRV.PING``) or a line in a
process's output, each polled under a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from transport import NatsServer

pytestmark = pytest.mark.nats

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).with_name("orchestrator")
DEADLINE = 20.0
"""Seconds any one wait may take (generous: a loaded CI machine starts Python slowly)."""
POLL = 0.05

BOOK = '{"customer": "ada@example.com", "items": [{"sku": "book", "qty": 2}]}'
FAILING = (
    '{"customer": "bob@example.com", "items": [{"sku": "pen", "qty": 1}], '
    '"fail_at": "create-order"}'
)

DEV_APP = '''
"""An app for `orchestrator up`: the shop, the approval flow, and a workflow with a hook."""
from typing import Any

from examples.approval import ApprovalContainer, approval
from examples.shop import ShopContainer, checkout
from orchestrator import (
    StepContext, WorkflowData, WorkflowResponse, create_hook, create_step, create_workflow,
)


@create_step("greet")
async def greet(name: str, ctx: StepContext) -> str:
    return f"hello {name}"


@create_workflow("greeting")
def greeting(input: WorkflowData) -> WorkflowResponse:
    text = greet(input.name)
    said = create_hook("greeted", {"greeting": text})
    return WorkflowResponse(text, hooks=[said])


def make_container() -> dict[str, Any]:
    shop, desk = ShopContainer(), ApprovalContainer()
    return {**shop.services, "requests": desk.requests, "settings": desk.settings}
'''


def _prefix() -> str:
    return f"cli{uuid.uuid4().hex[:10]}"


def _command(*args: str) -> list[str]:
    if CONSOLE_SCRIPT.is_file():
        return [str(CONSOLE_SCRIPT), *args]
    return [sys.executable, "-m", "orchestrator.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), COLUMNS="200", NO_COLOR="1", **extra)
    return env


def _until(condition: Any, what: str, deadline: float = DEADLINE) -> Any:
    """Poll ``condition()`` until it returns something true; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(POLL)


@dataclass
class Proc:
    """A command line running in the background, its stdout and stderr in files."""

    name: str
    process: subprocess.Popen[bytes]
    out: Path
    err: Path

    @classmethod
    def spawn(
        cls, name: str, args: list[str], tmp: Path, *, cwd: Path = REPO_ROOT, **env: str
    ) -> Proc:
        out, err = tmp / f"{name}.out", tmp / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                _command(*args),
                cwd=cwd,
                env=_env(**env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        return cls(name, process, out, err)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, text: str, *, stream: str = "stderr") -> None:
        def seen() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited early:\n{self.stderr()[-3000:]}")
            return text in (self.stderr() if stream == "stderr" else self.stdout())

        _until(seen, f"{text!r} from {self.name}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig``; the exit code, which must come within the deadline."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.name} ignored {signal.Signals(sig).name}") from None

    def kill(self) -> None:
        """Clean up after a failed test: SIGTERM first, so `up` stops its nats-server too."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(DEADLINE / 2)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


# --------------------------------------------------------------------- NATS service discovery
async def _discover(url: str, verb: str, prefix: str, names: set[str]) -> dict[str, Any]:
    """Ask ``$SRV.<verb>`` until services of these names under ``prefix`` answer.

    Returns their answers by service name. Every service on the server answers; the ones of
    other tests are told apart by the prefix in their metadata.
    """

    async def quiet(error: Exception) -> None:
        pass

    with anyio.fail_after(DEADLINE):
        while True:  # the server may still be starting (`up`)
            try:
                nc = await nats.connect(url, allow_reconnect=False, error_cb=quiet)
                break
            except (OSError, nats.errors.Error):
                await anyio.sleep(POLL)
        try:
            found: dict[str, Any] = {}
            while not names <= found.keys():
                await _ask(nc, f"$SRV.{verb}", prefix, names, found)
            return found
        finally:
            await nc.close()


async def _ask(nc: Any, subject: str, prefix: str, names: set[str], found: dict[str, Any]) -> None:
    """One round of questions: answers for half a second, or until all of ``names`` answered."""
    send, receive = anyio.create_memory_object_stream[bytes](100)

    async def collect(msg: Any) -> None:
        if msg.data:  # not the server's "no responders" status
            send.send_nowait(msg.data)

    with send, receive:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect)
        try:
            await nc.publish(subject, b"", reply=inbox)
            with anyio.move_on_after(0.5):
                async for data in receive:
                    answer = json.loads(data)
                    if answer.get("metadata", {}).get("prefix") == prefix:
                        found[answer["name"]] = answer
                    if names <= found.keys():
                        return
        finally:
            await sub.unsubscribe()


def discover(url: str, prefix: str, *names: str, verb: str = "PING") -> dict[str, Any]:
    return anyio.run(_discover, url, verb, prefix, set(names))


# --------------------------------------------------------------------- fixtures
@dataclass
class Services:
    url: str
    prefix: str
    coordinator: Proc
    worker: Proc

    def flags(self) -> list[str]:
        return ["--servers", self.url, "--prefix", self.prefix]


def start_services(nats_server: NatsServer, tmp: Path, prefix: str) -> Services:
    """A coordinator configured by flags and a worker by ``ORCH_*`` variables, both ready."""
    url = nats_server.url
    coordinator = Proc.spawn(
        f"coordinator-{prefix}",
        ["coordinator", "examples.shop", "--servers", url, "--prefix", prefix],
        tmp,
    )
    worker = Proc.spawn(
        f"worker-{prefix}",
        ["worker", "examples.shop", "--concurrency", "4"],
        tmp,
        ORCH_SERVERS=url,
        ORCH_PREFIX=prefix,
    )
    try:
        discover(url, prefix, "orch-coordinator", "orch-worker")
    except BaseException as exc:
        for proc in (coordinator, worker):
            proc.kill()
        logs = "\n".join(f"{p.name}: {p.stderr()[-2000:]}" for p in (coordinator, worker))
        raise AssertionError(f"the services did not answer $SRV.PING:\n{logs}") from exc
    return Services(url, prefix, coordinator, worker)


@pytest.fixture(scope="module")
def services(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    """Both services of examples.shop, shared by the client tests of this module."""
    running = start_services(nats_server, tmp_path_factory.mktemp("services"), _prefix())
    yield running
    for proc in (running.coordinator, running.worker):
        try:
            proc.stop()
        finally:
            proc.kill()


def invoke(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def one_line_error(result: Any) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return str(lines[0])


# --------------------------------------------------------------------- tests
def test_services_answer_discovery(services: Services) -> None:
    pings = discover(services.url, services.prefix, "orch-coordinator", "orch-worker")
    assert pings["orch-coordinator"]["type"] == "io.nats.micro.v1.ping_response"
    assert pings["orch-coordinator"]["metadata"]["workflows"] == "checkout"
    assert pings["orch-worker"]["version"]

    info = discover(services.url, services.prefix, "orch-coordinator", verb="INFO")
    endpoints = info["orch-coordinator"]["endpoints"]
    assert [e["subject"] for e in endpoints] == [f"{services.prefix}.svc.coordinator.stats"]

    stats = discover(services.url, services.prefix, "orch-coordinator", "orch-worker", verb="STATS")
    assert stats["orch-coordinator"]["endpoints"][0]["data"]["workflows"] == ["checkout"]
    assert "charge-payment" in stats["orch-worker"]["endpoints"][0]["data"]["steps"]


def test_start_wait_status_and_list(runner: CliRunner, services: Services) -> None:
    tx = f"order-{uuid.uuid4().hex[:8]}"
    started = invoke(
        runner, "start", "checkout", "-i", BOOK, "-t", tx, "--wait", "--json", *services.flags()
    )
    assert started.exit_code == 0, started.output
    result = json.loads(started.stdout)
    assert result["transaction_id"] == tx
    assert result["state"] == "done"
    assert result["result"]["order"]["total"] == 5000

    status = invoke(runner, "status", tx, *services.flags())
    assert status.exit_code == 0, status.output
    assert f"transaction {tx}  state done" in status.stdout
    assert "create-order" in status.stdout
    assert '"total": 5000' in status.stdout

    failed = invoke(runner, "start", "checkout", "-i", FAILING, "--wait", *services.flags())
    assert failed.exit_code == 1, failed.output
    assert "state reverted" in failed.stdout
    assert "InjectedFailure" in failed.stdout

    listed = invoke(runner, "list", *services.flags())
    assert listed.exit_code == 0, listed.output
    assert tx in listed.stdout
    assert "reverted" in listed.stdout
    done = invoke(runner, "list", "--state", "done", "--json", *services.flags())
    assert tx in {r["transaction_id"] for r in json.loads(done.stdout)}
    assert {r["state"] for r in json.loads(done.stdout)} == {"done"}


def test_start_without_wait_prints_the_transaction_id(
    runner: CliRunner, services: Services
) -> None:
    started = invoke(runner, "start", "checkout", "-i", BOOK, *services.flags())
    assert started.exit_code == 0, started.output
    tx = started.stdout.strip()
    assert tx.startswith("checkout")

    def done() -> bool:
        status = invoke(runner, "status", tx, "--json", *services.flags())
        return status.exit_code == 0 and json.loads(status.stdout)["state"] == "done"

    _until(done, f"{tx} to finish")


def test_options_come_from_environment_variables(runner: CliRunner, services: Services) -> None:
    env = {"ORCH_SERVERS": services.url, "ORCH_PREFIX": services.prefix}
    tx = f"env-{uuid.uuid4().hex[:8]}"
    started = invoke(runner, "start", "checkout", "-i", BOOK, "-t", tx, "-w", env=env)
    assert started.exit_code == 0, started.output
    listed = invoke(runner, "list", "--json", env=env)
    assert tx in {r["transaction_id"] for r in json.loads(listed.stdout)}
    # A flag wins over its variable: another prefix has no coordinator.
    other = invoke(runner, "status", tx, "--prefix", _prefix(), env=env)
    assert other.exit_code == 3, other.output
    assert "no coordinator answers" in one_line_error(other)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "checkout", "--input", "{not json"], "--input is not valid JSON"),
        (["start", "no-such-workflow", "--input", "{}"], "unknown workflow 'no-such-workflow'"),
        (["status", "no-such-transaction"], "not found"),
        (["cancel", "no-such-transaction"], "not found"),
        (["complete-step", "checkout:nope:charge-payment:invoke"], "unknown idempotency key"),
        (["complete-step", "k", "--response", "{}", "--fail", "x"], "either --response or --fail"),
    ],
)
def test_bad_client_input_exits_2_with_one_line(
    runner: CliRunner, services: Services, args: list[str], message: str
) -> None:
    result = invoke(runner, *args, *services.flags())
    assert result.exit_code == 2, result.output
    assert message in one_line_error(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["coordinator", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
        (["worker", "examples.shop:nothing"], "has no attribute 'nothing'"),
        (["worker", "examples.shop", "--step", "nope"], "unknown step"),
        (["coordinator", "examples.shop:FREE_GIFT_THRESHOLD"], "expected a workflow"),
        (["coordinator", "examples.shop:PRICES"], "holds 2500 (int), not a workflow"),
        (["status", "tx", "--servers", "http://example.com"], "is not a NATS URL"),
        (["status", "tx", "--servers", "nats://h:port"], "invalid port"),
        (["status", "tx", "--password", "secret"], "--password needs --user"),
        (["status", "tx", "--token", "t", "--user", "u"], "use one"),
        (["status", "tx", "--creds", "/no/such.creds"], "--creds: no such file"),
        (["status", "tx", "--tls-ca", __file__], "--tls-ca"),
        (["status", "tx", "--prefix", "a b"], "--prefix"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    runner: CliRunner, nats_server: NatsServer, args: list[str], message: str
) -> None:
    result = invoke(runner, *args, env={"ORCH_SERVERS": nats_server.url})
    assert result.exit_code == 2, result.output
    assert message in one_line_error(result)


def test_unreachable_nats_exits_3(runner: CliRunner) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    result = invoke(runner, "list", "--servers", url, "--connect-timeout", "0.2")
    assert result.exit_code == 3, result.output
    assert f"cannot reach NATS at {url}" in one_line_error(result)


def test_sigterm_stops_both_services_gracefully(
    runner: CliRunner, nats_server: NatsServer, tmp_path: Path
) -> None:
    running = start_services(nats_server, tmp_path, _prefix())
    try:
        ran = invoke(runner, "start", "checkout", "-i", BOOK, "-w", *running.flags())
        assert ran.exit_code == 0, ran.output
        for proc in (running.coordinator, running.worker):
            assert proc.stop(signal.SIGTERM) == 0, proc.stderr()
            events = [json.loads(line) for line in proc.stderr().splitlines()]
            assert [e["event"] for e in events if e["event"] in ("ready", "stopped")] == [
                "ready",
                "stopped",
            ]
    finally:
        running.coordinator.kill()
        running.worker.kill()


@pytest.fixture
def dev_app(tmp_path: Path) -> Path:
    """A directory holding ``devapp.py`` (imported from the current directory)."""
    (tmp_path / "devapp.py").write_text(textwrap.dedent(DEV_APP))
    return tmp_path


def test_up_serves_workflows_end_to_end(runner: CliRunner, dev_app: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    prefix = _prefix()
    up = Proc.spawn(
        "up", ["up", "devapp", "--port", str(port), "--prefix", prefix], dev_app, cwd=dev_app
    )
    try:
        discover(url, prefix, "orch-coordinator", "orch-worker")
        up.wait_for(
            f"orchestrator start approval --servers {url} --prefix {prefix}", stream="stdout"
        )
        flags = ["--servers", url, "--prefix", prefix]

        ran = invoke(runner, "start", "checkout", "-i", BOOK, "-w", "--json", *flags)
        assert ran.exit_code == 0, ran.output
        assert json.loads(ran.stdout)["state"] == "done"

        # An async step: waits for complete-step; watch follows it to the end.
        change = '{"change": {"feature": "dark-mode"}, "requested_by": "bob"}'
        started = invoke(runner, "start", "approval", "-i", change, "-t", "change-1", "-w", *flags)
        assert started.exit_code == 0, started.output
        key = "approval:change-1:await-approval:invoke"
        assert key in started.stdout
        watch = Proc.spawn("watch", ["watch", "change-1", *flags], dev_app)
        hooks = Proc.spawn("hooks", ["hooks", "greeting", "greeted", *flags], dev_app)
        try:
            watch.wait_for("watching change-1")
            completed = invoke(
                runner,
                "complete-step",
                key,
                "--response",
                '{"approved": true, "by": "ann"}',
                *flags,
            )
            assert completed.exit_code == 0, completed.output
            assert "state done" in completed.stdout
            assert watch.process.wait(DEADLINE) == 0, watch.stderr()
            assert "apply-change" in watch.stdout()
            assert "state done" in watch.stdout()

            hooks.wait_for("listening on")
            greeted = invoke(runner, "start", "greeting", "-i", '{"name": "ada"}', "-w", *flags)
            assert greeted.exit_code == 0, greeted.output
            hooks.wait_for('{"greeting":"hello ada"}', stream="stdout")
            assert hooks.stop(signal.SIGINT) == 0, hooks.stderr()
        finally:
            watch.kill()
            hooks.kill()

        cancelled = invoke(runner, "cancel", "change-1", "--json", *flags)
        assert cancelled.exit_code == 0, cancelled.output
        assert json.loads(cancelled.stdout)["state"] == "reverted"

        assert up.stop(signal.SIGTERM) == 0, up.stderr()
        assert "stopped" in up.stderr()
        with socket.socket() as probe:  # the embedded nats-server is gone too
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        up.kill()
