"""The command line's NATS auth against real servers: a token, an nkey seed, user and password;
wrong credentials get a one-line error, never a traceback.

No coordinator serves these servers: a command that got in says that no coordinator answers,
one that did not says the server refused it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from transport import NatsServer

pytestmark = pytest.mark.nats


def _server(authorization: str) -> Iterator[NatsServer]:
    with NatsServer(config=f"authorization {{\n{authorization}\n}}\n") as server:
        yield server


@pytest.fixture(scope="module")
def token_server() -> Iterator[NatsServer]:
    yield from _server('  token: "s3cret-token"')


@pytest.fixture(scope="module")
def nkey_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path_factory.mktemp("nkey") / "user.nk"
    path.write_bytes(seed + b"\n")
    return path


@pytest.fixture(scope="module")
def nkey_server(nkey_seed: Path) -> Iterator[NatsServer]:
    public = nkeys.from_seed(nkey_seed.read_bytes().strip()).public_key.decode()
    yield from _server(f'  users: [ {{ nkey: "{public}" }} ]')


@pytest.fixture(scope="module")
def user_server() -> Iterator[NatsServer]:
    yield from _server('  users: [ { user: "ops", password: "pa55" } ]')


def _list(runner: CliRunner, server: NatsServer, *auth: str) -> tuple[int, str]:
    args = ["list", "--servers", server.url, "--prefix", "auth", "--connect-timeout", "2"]
    result = runner.invoke(app, [*args, *auth])
    return result.exit_code, result.output


def _refused(code: int, output: str) -> None:
    assert code == 3, output
    message = _one_line_error(output)
    assert "refused the login" in message, message
    assert "Authorization Violation" in message, message


def _got_in(code: int, output: str) -> None:
    assert code == 3, output
    assert "no coordinator answers" in _one_line_error(output), output


def _one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


def test_a_token_opens_the_server(runner: CliRunner, token_server: NatsServer) -> None:
    _got_in(*_list(runner, token_server, "--token", "s3cret-token"))
    code, output = _list(runner, token_server, "--token", "wrong")
    _refused(code, output)


def test_a_token_from_the_environment(token_server: NatsServer) -> None:
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "ORCH_TOKEN": "s3cret-token"})
    _got_in(*_list(runner, token_server))


def test_an_nkey_seed_opens_the_server(
    runner: CliRunner, nkey_server: NatsServer, nkey_seed: Path, tmp_path: Path
) -> None:
    _got_in(*_list(runner, nkey_server, "--nkey-seed", str(nkey_seed)))
    other = tmp_path / "other.nk"
    other.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    code, output = _list(runner, nkey_server, "--nkey-seed", str(other))
    _refused(code, output)


def test_a_user_and_password_open_the_server(runner: CliRunner, user_server: NatsServer) -> None:
    _got_in(*_list(runner, user_server, "--user", "ops", "--password", "pa55"))
    code, output = _list(runner, user_server, "--user", "ops", "--password", "nope")
    _refused(code, output)
