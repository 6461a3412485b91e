"""``orchestrator run``: results, exit codes and errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

REPO_ROOT = Path(__file__).resolve().parents[2]

BOOK = '{"customer": "ada@example.com", "items": [{"sku": "book", "qty": 2}]}'


def run_json(runner: CliRunner, *args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["run", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def test_run_success_prints_result_and_steps(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "examples.shop:checkout", "--input", BOOK])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "state done" in out
    assert '"id": "ord-1001"' in out  # the result, as JSON
    for step in ("reserve-inventory", "charge-payment", "create-order", "send-confirmation"):
        assert step in out
    assert "duration ms" in out
    assert "errors" not in out


def test_run_json_is_the_whole_result(runner: CliRunner) -> None:
    code, data = run_json(runner, "examples.shop:checkout", "-i", BOOK, "-t", "order-7")
    assert code == 0
    assert data["state"] == "done"
    assert data["transaction_id"] == "order-7"
    assert data["result"]["order"]["total"] == 5000
    assert data["result"]["gift"] is None  # under the free-gift threshold: skipped
    states = {s["name"]: s["state"] for s in data["steps"]}
    assert states["add-free-gift"] == "skipped"
    assert states["update-loyalty-points"] == "done"


def test_run_failing_checkout_exits_1_and_prints_error(runner: CliRunner) -> None:
    payload = '{"items": [{"sku": "book", "qty": 1}], "fail_at": "create-order"}'
    result = runner.invoke(app, ["run", "examples.shop:checkout", "--input", payload])
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "state reverted" in out
    assert "InjectedFailure" in out
    assert "injected failure at create-order" in out
    assert "Traceback" not in result.output  # only with --tracebacks


def test_run_failure_details_in_json(runner: CliRunner) -> None:
    payload = '{"items": [{"sku": "pen", "qty": 1}], "fail_at": "charge-payment"}'
    code, data = run_json(runner, "examples.shop:checkout", "--input", payload)
    assert code == 1
    assert data["state"] == "reverted"
    [error] = data["errors"]
    assert (error["step"], error["action"], error["type"]) == (
        "charge-payment",
        "invoke",
        "InjectedFailure",
    )
    steps = {s["name"]: s for s in data["steps"]}
    assert steps["charge-payment"]["attempts"] == 3  # max_retries=2
    assert steps["reserve-inventory"]["state"] == "reverted"
    assert steps["create-order"]["state"] == "not_started"


def test_run_declined_payment_is_permanent(runner: CliRunner) -> None:
    payload = '{"items": [{"sku": "pen", "qty": 1}], "fail_payment": true}'
    code, data = run_json(runner, "examples.shop:checkout", "--input", payload)
    assert code == 1
    assert [e["type"] for e in data["errors"]] == ["PermanentFailure"]
    steps = {s["name"]: s for s in data["steps"]}
    assert steps["charge-payment"]["attempts"] == 1  # no retries


def test_run_tracebacks_flag(runner: CliRunner) -> None:
    payload = '{"items": [{"sku": "pen", "qty": 1}], "fail_at": "send-confirmation"}'
    args = ["run", "examples.shop:checkout", "-i", payload, "--tracebacks"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stdout
    assert "send_confirmation" in result.stdout


def test_run_async_workflow_waits_and_prints_keys(runner: CliRunner) -> None:
    payload = '{"change": {"dark-mode": true}, "requested_by": "bob"}'
    args = ["run", "examples.approval:approval", "-i", payload, "-t", "tx-1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "state invoking" in result.stdout
    assert "approval:tx-1:await-approval:invoke" in result.stdout


def test_run_input_from_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text(BOOK, encoding="utf-8")
    code, data = run_json(runner, "examples.shop:checkout", "--input", f"@{path}")
    assert code == 0
    assert data["result"]["order"]["customer"] == "ada@example.com"


def test_run_input_from_stdin(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "examples.shop:checkout", "-i", "-", "--json"], input=BOOK)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "done"


def assert_usage_error(result: Any, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ('{"items": ', "Expecting value"),
        ("{'single': 'quotes'}", "Expecting property name"),
        ("not json", "Expecting value"),
        ('{"a": 1} trailing', "Extra data"),
    ],
)
def test_malformed_input_is_a_one_line_error(
    runner: CliRunner, payload: str, fragment: str
) -> None:
    result = runner.invoke(app, ["run", "examples.shop:checkout", "--input", payload])
    assert_usage_error(result, "--input is not valid JSON", fragment)


def test_malformed_context(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "examples.shop:checkout", "--context", "{oops"])
    assert_usage_error(result, "--context is not valid JSON")
    result = runner.invoke(app, ["run", "examples.shop:checkout", "--context", "[1, 2]"])
    assert_usage_error(result, "--context must be a JSON object")


def test_missing_input_file(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    result = runner.invoke(app, ["run", "examples.shop:checkout", "--input", f"@{missing}"])
    assert_usage_error(result, "--input: cannot read", "nope.json")


def test_unknown_workflow_attribute(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "examples.shop:chekout", "--input", "{}"])
    assert_usage_error(result, "has no attribute 'chekout'", "workflows in it: checkout")


def test_attribute_that_is_not_a_workflow(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "examples.shop:make_container"])
    assert_usage_error(result, "examples.shop:make_container is a function, not a workflow")


def test_unknown_module(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "examples.nowhere:checkout"])
    assert_usage_error(result, "cannot import module 'examples.nowhere'")


@pytest.mark.parametrize("spec", [":checkout", "examples.shop:", ""])
def test_malformed_spec(runner: CliRunner, spec: str) -> None:
    result = runner.invoke(app, ["run", spec])
    assert_usage_error(result, "MODULE:ATTRIBUTE")


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Write a module in a temporary directory (the current one) and import it from there."""
    names: list[str] = []
    monkeypatch.chdir(tmp_path)

    def write(source: str) -> str:
        name = f"cli_user_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


GREETER = textwrap.dedent(
    """
    from orchestrator import create_step, create_workflow

    @create_step("greet")
    async def greet(data, ctx):
        return ctx.container.resolve("greeting") + ", " + data["name"]

    greeter = create_workflow("greeter", lambda inp: greet(inp))
    """
)


def test_module_from_current_directory_with_container_attribute(
    runner: CliRunner, user_module: Any
) -> None:
    name = user_module(GREETER + '\ncontainer = {"greeting": "hello"}\n')
    code, data = run_json(runner, f"{name}:greeter", "-i", '{"name": "ada"}')
    assert code == 0
    assert data["result"] == "hello, ada"


def test_container_option_overrides_and_factories_are_called(
    runner: CliRunner, user_module: Any
) -> None:
    name = user_module(
        GREETER
        + '\ncontainer = {"greeting": "hello"}\n'
        + 'async def make_other():\n    return {"greeting": "hi"}\n'
    )
    code, data = run_json(
        runner, f"{name}:greeter", "-i", '{"name": "ada"}', "--container", f"{name}:make_other"
    )
    assert code == 0
    assert data["result"] == "hi, ada"


def test_workflow_by_name_or_alone_in_module(runner: CliRunner, user_module: Any) -> None:
    name = user_module(GREETER + '\ncontainer = {"greeting": "hey"}\n')
    for spec in (name, f"{name}:greeter"):
        code, data = run_json(runner, spec, "-i", '{"name": "bo"}')
        assert (code, data["result"]) == (0, "hey, bo")


def test_module_that_fails_to_import(runner: CliRunner, user_module: Any) -> None:
    name = user_module("import json\nraise RuntimeError('broken at import')\n")
    result = runner.invoke(app, ["run", f"{name}:wf"])
    assert_usage_error(result, f"importing module {name!r} failed", "RuntimeError")
    assert "broken at import" in result.stderr


def test_module_importing_a_missing_dependency(runner: CliRunner, user_module: Any) -> None:
    name = user_module("import surely_not_installed_pkg\n")
    result = runner.invoke(app, ["run", f"{name}:wf"])
    assert_usage_error(result, f"importing module {name!r} failed", "surely_not_installed_pkg")


def test_bad_container_option(runner: CliRunner) -> None:
    result = runner.invoke(
        app, ["run", "examples.shop:checkout", "--container", "examples.shop:FREE_GIFT_THRESHOLD"]
    )
    assert_usage_error(result, "is not a container")
    result = runner.invoke(app, ["run", "examples.shop:checkout", "--container", "examples.shop:x"])
    assert_usage_error(result, "--container: module 'examples.shop' has no attribute 'x'")


def test_console_script_process_malformed_input_has_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "examples.shop:checkout", "-i", "{"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --input is not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_run_timeout_shows_the_current_picture(runner: CliRunner, user_module: Any) -> None:
    name = user_module(
        textwrap.dedent(
            """
            import anyio
            from orchestrator import create_step, create_workflow

            @create_step("nap")
            async def nap(data, ctx):
                await anyio.sleep(30)

            sleepy = create_workflow("sleepy", lambda inp: nap(inp))
            """
        )
    )
    result = runner.invoke(app, ["run", f"{name}:sleepy", "--timeout", "0.05", "-t", "tx-9"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == "error: the run did not settle within 0.05 s"
    assert "transaction tx-9  state invoking" in result.stdout
    assert "Traceback" not in result.output
