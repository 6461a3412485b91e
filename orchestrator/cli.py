"""The ``orchestrator`` command line.

In this process (local mode):

- ``orchestrator run MODULE:WORKFLOW --input JSON``: run a workflow on a
  :class:`~orchestrator.LocalEngine`, print its result as JSON, a table of its steps and, for a
  failed run, its errors.
- ``orchestrator graph MODULE:WORKFLOW [--format mermaid|dot]``: print the workflow's graph.

Services on NATS (``APP`` is ``MODULE`` or ``MODULE:ATTR``, see :func:`load_app`):

- ``orchestrator coordinator APP``: run transactions, until SIGTERM or SIGINT.
- ``orchestrator worker APP [--step NAME ...]``: run step handlers, until SIGTERM or SIGINT.
- ``orchestrator up APP``: a development stack in one process: a nats-server, a coordinator and
  a worker.

Both services answer NATS service discovery (``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``) as
``orch-coordinator`` and ``orch-worker``, and log JSON lines to stderr (``up``: readable lines).

Clients of the services: ``start``, ``status``, ``list``, ``watch``, ``cancel``,
``complete-step`` and ``hooks``. Every command that connects takes the NATS options
(``--servers``, credentials, TLS files, ``--prefix``, ``--partitions``), each also read from an
``ORCH_*`` environment variable.

Exit codes: 0 ok; 1 the transaction was reverted or failed (``run``, ``start --wait``,
``status``, ``watch``; ``cancel`` when a compensation failed), or the wait timed out; 2 bad
input (malformed JSON, an unknown module, workflow, transaction or step key, a bad option value),
always a one-line message; 3 NATS or the services could not be reached; 130 interrupted.

``MODULE`` is imported with the current directory on ``sys.path``. The container for ``run``
and ``worker`` is ``--container MODULE:ATTR`` when given, else the app's ``make_container()``
factory or its ``container`` attribute.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib.metadata
import inspect
import logging
import math
import os
import shlex
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import anyio
import msgspec
import nats.errors
import structlog
import typer
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import SEMVER_REGEX, Service, ServiceConfig
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from actors import new_transaction_id
from transport import (
    Msg,
    NatsServer,
    NatsTransport,
    NoRespondersError,
    RequestTimeoutError,
    TransportError,
)

from ._app import (
    DEFAULT_SERVERS,
    App,
    CliError,
    NatsOptions,
    load_app,
    load_container,
    load_workflow,
    parse_json,
)
from ._client import Client, connect
from ._composer import Workflow
from ._errors import (
    ConfigurationError,
    OrchestratorError,
    StepNotAwaitingError,
    TransactionNotFoundError,
)
from ._graph import Graph, Node
from ._local import LocalEngine
from ._types import LifecycleEvent, StepState, TransactionState, WorkflowResult
from .services import (
    DEFAULT_ACK_WAIT,
    DEFAULT_LEASE_TTL,
    DEFAULT_MAX_DELIVER,
    DEFAULT_RETENTION,
    Coordinator,
    Worker,
    loop_options,
)

__all__ = [
    "App",
    "CliError",
    "GraphFormat",
    "LogFormat",
    "NatsOptions",
    "app",
    "awaiting_keys",
    "load_app",
    "load_container",
    "load_workflow",
    "main",
    "render_result",
    "to_dot",
    "to_mermaid",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="orchestrator",
    help="Run and inspect workflows with compensation (sagas).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class GraphFormat(enum.StrEnum):
    """The output formats of ``graph``."""

    MERMAID = "mermaid"
    DOT = "dot"


class LogFormat(enum.StrEnum):
    """How the services write their logs (to stderr)."""

    JSON = "json"
    CONSOLE = "console"


# ------------------------------------------------------------------------------ rendering
_STATE_STYLE = {
    StepState.DONE: "green",
    StepState.INVOKING: "cyan",
    StepState.COMPENSATING: "magenta",
    StepState.REVERTED: "yellow",
    StepState.FAILED: "bold red",
    StepState.TIMEOUT: "bold red",
    StepState.SKIPPED: "dim",
    StepState.SKIPPED_FAILURE: "dim",
    StepState.NOT_STARTED: "dim",
}

_TX_STYLE = {
    TransactionState.DONE: "bold green",
    TransactionState.INVOKING: "bold cyan",
    TransactionState.REVERTED: "bold yellow",
    TransactionState.FAILED: "bold red",
}


def awaiting_keys(result: WorkflowResult, graph: Graph) -> list[str]:
    """The idempotency keys of the async steps (and compensations) that await a response."""
    keys = []
    for step in result.steps:
        node = graph.index.get(step.name)
        if node is None:
            continue
        if step.state == StepState.INVOKING and step.name in graph.async_nodes:
            action = "invoke"
        elif step.state == StepState.COMPENSATING and node.config.compensate_async:
            action = "compensate"
        else:
            continue
        keys.append(f"{result.workflow}:{result.transaction_id}:{step.name}:{action}")
    return keys


def in_progress_keys(result: WorkflowResult) -> list[str]:
    """The idempotency keys of the steps (and compensations) running or awaiting a response.

    A client has no workflow definitions, so it cannot tell async steps from running ones.
    """
    actions = {StepState.INVOKING: "invoke", StepState.COMPENSATING: "compensate"}
    return [
        f"{result.workflow}:{result.transaction_id}:{step.name}:{actions[step.state]}"
        for step in result.steps
        if step.state in actions
    ]


def _header(result: WorkflowResult) -> Text:
    return Text.assemble(
        ("workflow ", "dim"),
        (result.workflow, "bold"),
        ("  transaction ", "dim"),
        result.transaction_id,
        ("  state ", "dim"),
        (result.state.value, _TX_STYLE.get(result.state, "bold")),
    )


def _steps_table(result: WorkflowResult) -> Table:
    table = Table(
        title="steps", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
    )
    table.add_column("step", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("attempts", justify="right")
    table.add_column("compensations", justify="right")
    table.add_column("duration ms", justify="right")
    for step in result.steps:
        duration = step.duration
        table.add_row(
            step.name,
            Text(step.state.value, style=_STATE_STYLE.get(step.state, "")),
            str(step.attempts),
            str(step.compensate_attempts) if step.compensate_attempts else "",
            "" if duration is None else f"{duration * 1000:.2f}",
        )
    return table


def _errors_table(result: WorkflowResult) -> Table:
    table = Table(
        title="errors", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
    )
    table.add_column("step", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("type", style="red", no_wrap=True)
    table.add_column("message", overflow="fold")
    for error in result.errors:
        table.add_row(error.step, error.action, error.type, error.message)
    return table


def render_result(
    result: WorkflowResult,
    console: Console,
    *,
    graph: Graph | None = None,
    tracebacks: bool = False,
) -> None:
    """Print a run: its state, result (JSON), steps table, errors and the keys it awaits."""
    state = result.state
    console.print(_header(result), soft_wrap=True)
    console.print(Text("result", style="dim"))
    console.print_json(msgspec.json.encode(result.result).decode())
    if result.steps:
        console.print(_steps_table(result))
    if result.errors:
        console.print(_errors_table(result))
        if tracebacks:
            for error in result.errors:
                if error.traceback:
                    console.rule(f"{error.step} ({error.action})", style="red")
                    console.print(
                        error.traceback.rstrip(), markup=False, highlight=False, soft_wrap=True
                    )
    if not state.finished and graph is not None:
        keys = awaiting_keys(result, graph)
        if keys:
            console.print(
                Text(
                    f"waiting on {len(keys)} async step(s); complete each with "
                    "engine.set_step_success(key, response) or set_step_failure(key, error):",
                    style="cyan",
                ),
                soft_wrap=True,
            )
            for key in keys:
                console.print(Text(f"  {key}"), soft_wrap=True)
        else:
            console.print(Text("the run has not finished yet", style="cyan"))
    elif not state.finished:
        keys = in_progress_keys(result)
        if keys:
            console.print(
                Text(
                    f"{len(keys)} step(s) in progress; an async one that awaits a response is "
                    "completed with: orchestrator complete-step KEY --response JSON (or --fail "
                    "MESSAGE)",
                    style="cyan",
                ),
                soft_wrap=True,
            )
            for key in keys:
                console.print(Text(f"  {key}"), soft_wrap=True)
        else:
            console.print(Text("the transaction has not finished yet", style="cyan"))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def _list_table(results: Sequence[WorkflowResult]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("transaction", no_wrap=True)
    table.add_column("workflow", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("steps done", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("created", no_wrap=True)
    table.add_column("duration ms", justify="right")
    for result in results:
        done = sum(step.state == StepState.DONE for step in result.steps)
        duration = ""
        if result.created_at is not None and result.finished_at is not None:
            duration = f"{(result.finished_at - result.created_at) * 1000:.1f}"
        table.add_row(
            result.transaction_id,
            result.workflow,
            Text(result.state.value, style=_TX_STYLE.get(result.state, "")),
            f"{done}/{len(result.steps)}",
            str(len(result.errors)) if result.errors else "",
            _when(result.created_at),
            duration,
        )
    if not results:
        table.caption = "no transactions"
    return table


def _event_line(event: LifecycleEvent) -> Text:
    what = " ".join(
        part
        for part in (
            event.step or "",
            f"attempt {event.attempt}" if event.attempt else "",
            event.state or "",
            f"{event.error.type}: {event.error.message}" if event.error else "",
        )
        if part
    )
    clock = datetime.fromtimestamp(event.timestamp).strftime("%H:%M:%S.%f")[:-3]
    return Text.assemble((f"{clock} ", "dim"), (f"{event.type} ", "bold"), what)


def _watch_view(result: WorkflowResult, events: Sequence[LifecycleEvent]) -> Group:
    parts: list[Any] = [_header(result), _steps_table(result)]
    if result.errors:
        parts.append(_errors_table(result))
    if events:
        parts.append(Text("latest events", style="dim"))
        parts.extend(_event_line(event) for event in events)
    return Group(*parts)


def _json(result: WorkflowResult) -> str:
    return msgspec.json.format(msgspec.json.encode(result), indent=2).decode()


def _error(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err = Console(stderr=True)
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------ graphs
# ------------------------------------------------------------------------------ graphs
@dataclass
class _Block:
    """A ``when`` block of a graph with the nodes and blocks directly inside it."""

    name: str | None
    items: list[Node | _Block] = field(default_factory=list)


def _block_tree(graph: Graph) -> _Block:
    root = _Block(None)
    blocks: dict[tuple[str, ...], _Block] = {(): root}
    for node in graph.nodes:
        for depth in range(1, len(node.blocks) + 1):
            path = node.blocks[:depth]
            if path not in blocks:
                blocks[path] = _Block(path[-1])
                blocks[path[:-1]].items.append(blocks[path])
        blocks[node.blocks].items.append(node)
    return root


def _tags(node: Node) -> list[str]:
    cfg = node.config
    tags = [node.kind if node.kind != "subflow" else f"subflow {node.workflow}"]
    if cfg.async_:
        tags.append("async")
    if cfg.max_retries:
        tags.append(f"retries={cfg.max_retries}")
    if cfg.timeout is not None:
        tags.append(f"timeout={cfg.timeout:g}s")
    if node.kind == "step" and not cfg.no_compensation:
        tags.append("compensable")
    return tags


def _terminals(graph: Graph) -> list[str]:
    used = {pred for node in graph.nodes for pred in node.after}
    return [node.name for node in graph.nodes if node.name not in used]


def _mermaid_text(text: str) -> str:
    return (
        text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    )


def to_mermaid(graph: Graph) -> str:
    """The graph as a Mermaid ``flowchart TD``: steps, hooks, nested workflows, when blocks."""
    ids = {node.name: f"n{i}" for i, node in enumerate(graph.nodes)}
    shapes = {"hook": ('{{"', '"}}'), "subflow": ('[["', '"]]')}
    lines = ["flowchart TD", '    input(["input"])']

    def emit(block: _Block, indent: str, counter: Iterator[int]) -> None:
        for item in block.items:
            if isinstance(item, _Block):
                lines.append(
                    f'{indent}subgraph w{next(counter)} ["when {_mermaid_text(item.name or "")}"]'
                )
                emit(item, indent + "    ", counter)
                lines.append(f"{indent}end")
            else:
                left, right = shapes.get(item.kind, ('["', '"]'))
                label = f"{_mermaid_text(item.name)}<br/>{_mermaid_text(' · '.join(_tags(item)))}"
                lines.append(f"{indent}{ids[item.name]}{left}{label}{right}")

    emit(_block_tree(graph), "    ", iter(range(len(graph.nodes) + len(graph.whens) + 1)))
    lines.append('    result(["result"])')
    for node in graph.nodes:
        preds = [ids[p] for p in node.after] or ["input"]
        lines.extend(f"    {p} --> {ids[node.name]}" for p in preds)
    ends = [ids[name] for name in _terminals(graph)] or ["input"]
    lines.extend(f"    {e} --> result" for e in ends)
    return "\n".join(lines) + "\n"


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph) -> str:
    """The graph as Graphviz DOT: ``when`` blocks are dashed clusters."""
    ids = {node.name: f"n{i}" for i, node in enumerate(graph.nodes)}
    shapes = {"hook": "hexagon", "subflow": "component"}
    lines = [
        f"digraph {_dot_text(graph.name)} {{",
        "    rankdir=TB;",
        '    node [shape=box, style=rounded, fontname="Helvetica"];',
        '    input [label="input", shape=oval];',
        '    result [label="result", shape=oval];',
    ]

    def emit(block: _Block, indent: str, counter: Iterator[int]) -> None:
        for item in block.items:
            if isinstance(item, _Block):
                lines.append(f"{indent}subgraph cluster_{next(counter)} {{")
                lines.append(f"{indent}    label={_dot_text('when ' + (item.name or ''))};")
                lines.append(f"{indent}    style=dashed;")
                emit(item, indent + "    ", counter)
                lines.append(f"{indent}}}")
            else:
                label = _dot_text(f"{item.name}\n{' · '.join(_tags(item))}")
                shape = shapes.get(item.kind)
                extra = f", shape={shape}" if shape else ""
                lines.append(f"{indent}{ids[item.name]} [label={label}{extra}];")

    emit(_block_tree(graph), "    ", iter(range(len(graph.nodes) + len(graph.whens) + 1)))
    for node in graph.nodes:
        preds = [ids[p] for p in node.after] or ["input"]
        lines.extend(f"    {p} -> {ids[node.name]};" for p in preds)
    ends = [ids[name] for name in _terminals(graph)] or ["input"]
    lines.extend(f"    {e} -> result;" for e in ends)
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ commands
@app.callback()
def _root() -> None:
    """Run and inspect workflows with compensation (sagas)."""


class _RunFailure(Exception):
    """The run could not be carried out (raised outside the engine's ``async with``)."""

    def __init__(self, message: str, code: int, picture: WorkflowResult | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.picture = picture


async def _run(
    workflow: Workflow,
    module_name: str,
    input_value: Any,
    transaction_id: str | None,
    context: dict[str, Any] | None,
    container_spec: str | None,
    timeout: float | None,
) -> WorkflowResult:
    container = await load_container(module_name, container_spec)
    try:
        engine = LocalEngine(workflows=[workflow], container=container)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None
    tx = transaction_id or f"{workflow.name}-{os.urandom(12).hex()}"
    failure: _RunFailure | None = None
    # Errors are caught inside the `async with`: one that crosses the engine's exit comes out
    # wrapped in an ExceptionGroup (the engine's task group).
    async with engine:
        try:
            return await engine.run(
                workflow,
                input=input_value,
                transaction_id=tx,
                context=context,
                throw_on_error=False,
                timeout=timeout,
            )
        except TimeoutError:
            picture = None
            with contextlib.suppress(OrchestratorError):
                picture = await engine.get(tx)
            failure = _RunFailure(
                f"the run did not settle within {timeout:g} s", EXIT_FAILED, picture
            )
        except ConfigurationError as exc:
            failure = _RunFailure(f"{type(exc).__name__}: {exc}", EXIT_USAGE)
        except OrchestratorError as exc:
            failure = _RunFailure(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
    raise failure


@app.command()
def run(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:WORKFLOW",
            help="The module to import and the workflow in it, e.g. examples.shop:checkout.",
            show_default=False,
        ),
    ],
    input_json: Annotated[
        str,
        typer.Option(
            "--input",
            "-i",
            metavar="JSON",
            help="The workflow input as JSON; @FILE reads it from a file, - from stdin.",
        ),
    ] = "null",
    transaction_id: Annotated[
        str | None,
        typer.Option("--transaction-id", "-t", metavar="ID", help="The transaction id."),
    ] = None,
    context_json: Annotated[
        str | None,
        typer.Option("--context", metavar="JSON", help="The run's shared context: a JSON object."),
    ] = None,
    container_spec: Annotated[
        str | None,
        typer.Option(
            "--container",
            metavar="MODULE:ATTR",
            help="The container: a mapping, an object with resolve(name), or a factory. "
            "Default: the module's make_container() or container.",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", metavar="SECONDS", min=0, help="Stop waiting for the run after this."
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print only the whole result, as JSON."),
    ] = False,
    tracebacks: Annotated[
        bool,
        typer.Option("--tracebacks", help="Also print the tracebacks of the errors."),
    ] = False,
) -> None:
    """Run a workflow in this process (local mode) and print its result.

    Exit codes: 0 done (or waiting on async steps), 1 reverted or failed, 2 bad input.
    """
    try:
        input_value = parse_json(input_json, "--input")
        context: dict[str, Any] | None = None
        if context_json is not None:
            parsed = parse_json(context_json, "--context")
            if not isinstance(parsed, dict):
                raise CliError(f"--context must be a JSON object, got {type(parsed).__name__}")
            context = parsed
        workflow = load_workflow(spec)
        module_name = spec.strip().partition(":")[0]
        started = time.perf_counter()
        result = anyio.run(
            _run,
            workflow,
            module_name,
            input_value,
            transaction_id,
            context,
            container_spec,
            timeout,
        )
    except CliError as exc:
        _error(str(exc))
    except _RunFailure as exc:
        if exc.picture is not None and as_json:
            typer.echo(_json(exc.picture))
        elif exc.picture is not None:
            render_result(exc.picture, Console(), graph=workflow.graph, tracebacks=tracebacks)
        _error(str(exc), exc.code)
    elapsed = time.perf_counter() - started
    console = Console()
    if as_json:
        typer.echo(_json(result))
    else:
        render_result(result, console, graph=workflow.graph, tracebacks=tracebacks)
        console.print(Text(f"elapsed {elapsed * 1000:.1f} ms", style="dim"))
    failed = result.state in (TransactionState.REVERTED, TransactionState.FAILED)
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


@app.command()
def graph(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:WORKFLOW",
            help="The module to import and the workflow in it, e.g. examples.shop:checkout.",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        GraphFormat,
        typer.Option("--format", "-f", help="Mermaid flowchart or Graphviz DOT."),
    ] = GraphFormat.MERMAID,
) -> None:
    """Print a workflow's graph: steps, their order, hooks, nested workflows, when blocks."""
    try:
        workflow = load_workflow(spec)
    except CliError as exc:
        _error(str(exc))
    text = to_mermaid(workflow.graph) if fmt is GraphFormat.MERMAID else to_dot(workflow.graph)
    typer.echo(text, nl=False)


# ------------------------------------------------------------------------------ NATS options
_NATS_PANEL = "NATS connection"
_CLIENT_CONNECT_TIMEOUT = 10.0
"""Seconds a client command tries to reach NATS before it gives up (services keep trying)."""


def _nats_parameters(connect_timeout: float | None) -> list[inspect.Parameter]:
    """The NATS options every command that connects takes, each also an ``ORCH_*`` variable."""

    def option(name: str, default: Any, kind: Any, *flags: str, help: str, **kw: Any) -> Any:
        info = typer.Option(*flags, help=help, rich_help_panel=_NATS_PANEL, **kw)
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
        )

    return [
        option(
            "servers",
            DEFAULT_SERVERS,
            str,
            "--servers",
            "-s",
            envvar="ORCH_SERVERS",
            metavar="URLS",
            help="NATS server URLs, comma-separated.",
        ),
        option("user", None, str | None, "--user", envvar="ORCH_USER", help="User name to log in."),
        option(
            "password",
            None,
            str | None,
            "--password",
            envvar="ORCH_PASSWORD",
            help="Password to log in (with --user).",
            show_default=False,
        ),
        option("token", None, str | None, "--token", envvar="ORCH_TOKEN", help="Token to log in."),
        option(
            "creds",
            None,
            str | None,
            "--creds",
            envvar="ORCH_CREDS",
            metavar="FILE",
            help="NATS credentials file (user JWT and nkey seed).",
        ),
        option(
            "nkey_seed",
            None,
            str | None,
            "--nkey-seed",
            envvar="ORCH_NKEY_SEED",
            metavar="FILE",
            help="File with the nkey seed to log in with.",
        ),
        option(
            "tls_cert",
            None,
            str | None,
            "--tls-cert",
            envvar="ORCH_TLS_CERT",
            metavar="FILE",
            help="Client certificate (PEM) for TLS.",
        ),
        option(
            "tls_key",
            None,
            str | None,
            "--tls-key",
            envvar="ORCH_TLS_KEY",
            metavar="FILE",
            help="The client certificate's private key (PEM).",
        ),
        option(
            "tls_ca",
            None,
            str | None,
            "--tls-ca",
            envvar="ORCH_TLS_CA",
            metavar="FILE",
            help="CA certificates (PEM) to verify the server with.",
        ),
        option(
            "prefix",
            "orch",
            str,
            "--prefix",
            envvar="ORCH_PREFIX",
            help="Subject and stream prefix of the deployment.",
        ),
        option(
            "partitions",
            16,
            int,
            "--partitions",
            envvar="ORCH_PARTITIONS",
            min=1,
            help="Transaction partitions (the same for every service of a deployment).",
        ),
        option(
            "connect_timeout",
            connect_timeout,
            float | None,
            "--connect-timeout",
            envvar="ORCH_CONNECT_TIMEOUT",
            metavar="SECONDS",
            help="Give up reaching NATS after this long "
            + ("(default: keep trying for about two minutes)." if connect_timeout is None else "."),
        ),
    ]


def _with_nats(
    connect_timeout: float | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the NATS options; it receives them checked, as ``nats: NatsOptions``.

    Typer reads a command's parameters from its signature: the wrapper shows the command's own
    parameters followed by the NATS ones, and turns the latter into one ``NatsOptions``.
    """
    extra = _nats_parameters(connect_timeout)
    names = [p.name for p in extra]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "nats"]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            raw = {name: kwargs.pop(name) for name in names}
            try:
                options = NatsOptions.parse(**raw)
            except CliError as exc:
                _error(str(exc))
            command(nats=options, **kwargs)

        annotations = {k: v for k, v in command.__annotations__.items() if k != "nats"}
        annotations.update({p.name: p.annotation for p in extra})
        wrapper.__annotations__ = annotations
        # inspect.signature (which typer uses) reads __signature__ before anything else.
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own, *extra]
        )
        return wrapper

    return decorate


# ------------------------------------------------------------------------------ running
def _leaf(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups (task groups wrap what crosses them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _failure(exc: BaseException, nats: NatsOptions | None) -> tuple[str, int] | None:
    """The one-line message and exit code for a command's error; ``None``: a bug, re-raise."""
    exc = _leaf(exc)
    if isinstance(exc, CliError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, ConfigurationError | TransactionNotFoundError | StepNotAwaitingError):
        return f"{type(exc).__name__}: {exc}", EXIT_USAGE
    if isinstance(exc, NoRespondersError | RequestTimeoutError):
        where = "" if nats is None else f" with --prefix {nats.prefix} on {','.join(nats.servers)}"
        answer = "no coordinator answers" if isinstance(exc, NoRespondersError) else "no answer"
        return f"{answer} ({exc}): is a coordinator running{where}?", EXIT_UNAVAILABLE
    if isinstance(exc, TransportError):
        return str(exc), EXIT_UNAVAILABLE
    if isinstance(exc, OrchestratorError):
        return f"{type(exc).__name__}: {exc}", EXIT_FAILED
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out", EXIT_FAILED
    return None


def _execute(main: Callable[[], Awaitable[int]], nats: NatsOptions | None = None) -> NoReturn:
    """Run a command's async body; its errors become one line and an exit code."""
    try:
        code = anyio.run(main, backend_options=loop_options())
    except Exception as exc:
        failure = _failure(exc, nats)
        if failure is None:
            raise
        _error(*failure)
    raise typer.Exit(code)


@dataclass
class _Lifetime:
    """When a command stops: at SIGTERM or SIGINT, or (a service) when NATS is gone for good."""

    stopping: anyio.Event = field(default_factory=anyio.Event)
    reason: str = ""
    code: int = EXIT_OK
    interrupted: bool = False
    """The body was cancelled (a second signal, or the first one with ``cancel=True``)."""

    def stop(self, reason: str, code: int = EXIT_OK) -> None:
        if not self.stopping.is_set():
            self.reason, self.code = reason, code
            self.stopping.set()

    async def connection_closed(self) -> None:
        """nats-py's ``closed_cb``: after leaving, or when it gave up reconnecting."""
        self.stop("the NATS connection closed (reconnecting failed)", EXIT_UNAVAILABLE)


@contextlib.asynccontextmanager
async def _lifetime(*, cancel: bool = False) -> AsyncIterator[_Lifetime]:
    """Catch SIGTERM and SIGINT while the body runs.

    The first signal sets ``stopping`` (the body then leaves its ``async with`` blocks, which is
    the graceful stop) or, with ``cancel``, cancels the body; a second one always cancels it.
    """
    lifetime = _Lifetime()
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def watch() -> None:
                async for signum in signals:
                    if cancel or lifetime.stopping.is_set():
                        lifetime.interrupted = True
                        tg.cancel_scope.cancel()
                        return
                    lifetime.stop(signal.Signals(signum).name)

            tg.start_soon(watch)
            try:
                yield lifetime
            finally:
                tg.cancel_scope.cancel()


class _GaveUp(Exception):
    """Raised from nats-py's error callback to end a first connection that takes too long."""


class _FirstConnection:
    """nats-py's ``error_cb``: bounds the first connection by ``--connect-timeout``.

    nats-py retries a first connection as it does a reconnection (about two minutes by
    default). Cancelling the connect instead would leave the transport's task group half
    entered; an exception raised from this callback ends nats-py's retry loop, and nothing
    outside it. Once connected, errors (a lost connection...) are only recorded or logged.
    """

    def __init__(self, nats: NatsOptions, log: Any = None) -> None:
        self.nats = nats
        self.log = log
        self.deadline: float | None = None
        self.connected = False
        self.last: Exception | None = None
        self.refused: Exception | None = None

    def __enter__(self) -> _FirstConnection:
        if self.nats.connect_timeout is not None:
            self.deadline = time.monotonic() + self.nats.connect_timeout
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.connected = True
        if isinstance(exc, _GaveUp) and self.refused is not None:
            raise TransportError(
                f"NATS at {','.join(self.nats.servers)} refused the login "
                f"({_describe_nats(self.refused)}): check --user/--password, --token, "
                "--creds or --nkey-seed"
            ) from None
        if isinstance(exc, _GaveUp):
            why = "" if self.last is None else f" (last error: {_describe_nats(self.last)})"
            raise TransportError(
                f"cannot reach NATS at {','.join(self.nats.servers)} within "
                f"{self.nats.connect_timeout:g} s{why}"
            ) from None

    async def on_error(self, error: Exception) -> None:
        """The callback (nats-py wants a coroutine function, not an awaitable object)."""
        self.last = error
        if self.log is not None:
            self.log.warning("NATS connection", error=_describe_nats(error))
        refused = isinstance(error, nats.errors.AuthorizationError) or (
            "authorization violation" in str(error).lower()  # how it comes while connecting
        )
        if not self.connected and refused:
            self.refused = error  # trying again cannot help
            raise _GaveUp
        if not self.connected and self.deadline is not None and time.monotonic() > self.deadline:
            raise _GaveUp


def _describe_nats(error: Exception) -> str:
    return str(error) or type(error).__name__


@contextlib.asynccontextmanager
async def _client(nats: NatsOptions) -> AsyncIterator[Client]:
    """A connected client of the services, for one command."""
    first = _FirstConnection(nats)
    client = connect(
        nats.server_list,
        prefix=nats.prefix,
        partitions=nats.partitions,
        name="orchestrator-cli",
        error_cb=first.on_error,
        **nats.options,
    )
    with first:
        await client.__aenter__()
    try:
        yield client
    finally:
        # Not shielded: leaving the transport exits its task group, which must be the
        # innermost cancel scope then.
        await client.__aexit__(None, None, None)


def _with_client(nats: NatsOptions, body: Callable[[Client], Awaitable[int]]) -> NoReturn:
    async def main() -> int:
        async with _client(nats) as client:
            return await body(client)

    _execute(main, nats)


# ------------------------------------------------------------------------------ services
_DESCRIPTIONS = {
    "coordinator": "Runs workflow transactions (sagas): starts, step results, compensations.",
    "worker": "Runs the step handlers (actions and compensations) of workflows.",
}


def _version() -> str:
    """The package's version, as service discovery wants it (semantic versioning)."""
    try:
        version = importlib.metadata.version("orchestrator")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
    return version if SEMVER_REGEX.match(version) else "0.0.0"


@contextlib.asynccontextmanager
async def _discovery(
    transport: NatsTransport,
    *,
    kind: str,
    prefix: str,
    stats: Callable[[], dict[str, Any]],
    metadata: dict[str, str],
) -> AsyncIterator[Service]:
    """Answer ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` as ``orch-<kind>``.

    The service's one endpoint, ``<prefix>.svc.<kind>.stats``, answers with the service's
    figures; ``$SRV.STATS`` carries the same figures as that endpoint's ``data``.
    """
    config = ServiceConfig(
        name=f"orch-{kind}",
        version=_version(),
        description=_DESCRIPTIONS[kind],
        metadata=metadata,
        stats_handler=lambda _endpoint: stats(),
    )
    service = await add_service(transport.nats_client, config)
    try:

        async def answer(request: Request) -> None:
            await request.respond(msgspec.json.encode(stats()))

        await service.add_endpoint(
            name="stats", subject=f"{prefix}.svc.{kind}.stats", handler=answer
        )
        yield service
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
            await service.stop()


def _metadata(prefix: str, partitions: int, served: App) -> dict[str, str]:
    return {"prefix": prefix, "partitions": str(partitions), "workflows": ",".join(served.names)}


async def _serve(
    kind: str,
    nats: NatsOptions,
    build: Callable[[NatsTransport], Awaitable[Coordinator | Worker]],
    metadata: dict[str, str],
    logs: tuple[LogFormat, int],
) -> int:
    """Run one service until SIGTERM or SIGINT, then leave its ``async with`` (graceful).

    Logging is set up once the service is built: a command that fails on its input leaves the
    process's logging as it was (this matters when it runs inside another program, a test).
    """
    log = structlog.get_logger(f"orchestrator.cli.{kind}")
    async with _lifetime() as lifetime:
        first = _FirstConnection(nats, log)
        transport = NatsTransport(
            nats.server_list,
            name=f"orch-{kind}",
            error_cb=first.on_error,
            closed_cb=lifetime.connection_closed,
            **nats.options,
        )
        service = await build(transport)
        _configure_logging(*logs)
        async with contextlib.AsyncExitStack() as stack:
            with first:
                await stack.enter_async_context(transport)
            await stack.enter_async_context(service)
            discovery = await stack.enter_async_context(
                _discovery(
                    transport,
                    kind=kind,
                    prefix=nats.prefix,
                    stats=service.stats,
                    metadata=metadata,
                )
            )
            log.info(
                "ready",
                service=f"orch-{kind}",
                id=discovery.id,
                servers=list(nats.servers),
                prefix=nats.prefix,
                **{k: v for k, v in metadata.items() if k != "prefix"},
            )
            await lifetime.stopping.wait()
            log.info("stopping", reason=lifetime.reason)
    if lifetime.interrupted:
        log.warning("stopped at once (a second signal)")
        return EXIT_INTERRUPTED
    log.info("stopped", reason=lifetime.reason)
    return lifetime.code


_log_format_option = typer.Option(
    "--log-format", envvar="ORCH_LOG_FORMAT", help="JSON lines, or readable lines for a terminal."
)
_log_level_option = typer.Option(
    "--log-level", envvar="ORCH_LOG_LEVEL", metavar="LEVEL", help="debug, info, warning, error."
)
_ack_wait_option = typer.Option(
    "--ack-wait",
    envvar="ORCH_ACK_WAIT",
    metavar="SECONDS",
    min=1,
    help="Redeliver work a dead service left unsettled after this long; give coordinators and "
    f"workers the same (default: {DEFAULT_ACK_WAIT:g}).",
    show_default=False,
)
_replicas_option = typer.Option(
    "--replicas",
    envvar="ORCH_REPLICAS",
    metavar="N",
    min=1,
    max=5,
    help="Copies a NATS cluster keeps of the streams and buckets this service creates "
    "(default: 1; 3 on a three-node cluster).",
    show_default=False,
)
_app_argument = typer.Argument(
    metavar="APP",
    help="MODULE (its workflows, make_container() or container) or MODULE:ATTR (a workflow, a "
    "list of them, or an object with `workflows` and optional container/make_container).",
    show_default=False,
)


def _queue_options(ack_wait: float | None, replicas: int | None) -> dict[str, Any]:
    """The work-queue options both services take, as given on the command line."""
    options: dict[str, Any] = {}
    if ack_wait is not None:
        options["ack_wait"] = ack_wait
    if replicas is not None:
        options["replicas"] = replicas
    return options


def _load(spec: str) -> App:
    try:
        return load_app(spec)
    except CliError as exc:
        _error(str(exc))


def _check_level(level: str) -> int:
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        _error(f"--log-level: unknown level {level!r} (debug, info, warning, error)")
    return number


@app.command()
@_with_nats()
def coordinator(
    spec: Annotated[str, _app_argument],
    retention: Annotated[
        float | None,
        typer.Option(
            "--retention",
            envvar="ORCH_RETENTION",
            metavar="SECONDS",
            min=0,
            help=f"Keep finished transactions this long (default: {DEFAULT_RETENTION:g}).",
            show_default=False,
        ),
    ] = None,
    max_payload: Annotated[
        int | None,
        typer.Option(
            "--max-payload",
            envvar="ORCH_MAX_PAYLOAD",
            metavar="BYTES",
            min=1,
            help="Refuse start requests larger than this (default: 1 MiB).",
            show_default=False,
        ),
    ] = None,
    lease_ttl: Annotated[
        float | None,
        typer.Option(
            "--lease-ttl",
            envvar="ORCH_LEASE_TTL",
            metavar="SECONDS",
            min=1,
            help="A coordinator that stops renewing its partition leases (it died) loses them "
            f"to the others after this long (default: {DEFAULT_LEASE_TTL:g}).",
            show_default=False,
        ),
    ] = None,
    ack_wait: Annotated[float | None, _ack_wait_option] = None,
    replicas: Annotated[int | None, _replicas_option] = None,
    log_format: Annotated[LogFormat, _log_format_option] = LogFormat.JSON,
    log_level: Annotated[str, _log_level_option] = "info",
    *,
    nats: NatsOptions,
) -> None:
    """Run a coordinator service: it runs the transactions of the APP's workflows.

    Serves until SIGTERM or SIGINT, then stops gracefully. Answers NATS service discovery as
    orch-coordinator.
    """
    level = _check_level(log_level)
    served = _load(spec)
    options: dict[str, Any] = {}
    if retention is not None:
        options["retention"] = retention
    if max_payload is not None:
        options["max_payload"] = max_payload
    if lease_ttl is not None:
        options["lease_ttl"] = lease_ttl
    options.update(_queue_options(ack_wait, replicas))

    async def build(transport: NatsTransport) -> Coordinator:
        return Coordinator(
            served.workflows,
            transport=transport,
            prefix=nats.prefix,
            partitions=nats.partitions,
            **options,
        )

    metadata = _metadata(nats.prefix, nats.partitions, served)
    logs = (log_format, level)
    _execute(lambda: _serve("coordinator", nats, build, metadata, logs), nats)


@app.command()
@_with_nats()
def worker(
    spec: Annotated[str, _app_argument],
    steps: Annotated[
        list[str] | None,
        typer.Option(
            "--step",
            metavar="NAME",
            help="Run only this step (repeat for more; default: every step of the workflows).",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            envvar="ORCH_CONCURRENCY",
            metavar="N",
            min=1,
            help="Most step runs at once per step name (a step's own limit still applies).",
        ),
    ] = None,
    container_spec: Annotated[
        str | None,
        typer.Option(
            "--container",
            metavar="MODULE:ATTR",
            help="The container: a mapping, an object with resolve(name), or a factory. "
            "Default: the APP's make_container() or container.",
        ),
    ] = None,
    max_deliver: Annotated[
        int | None,
        typer.Option(
            "--max-deliver",
            envvar="ORCH_MAX_DELIVER",
            metavar="N",
            min=1,
            help="A step whose worker dies under it this many times fails for good "
            f"(default: {DEFAULT_MAX_DELIVER}).",
            show_default=False,
        ),
    ] = None,
    ack_wait: Annotated[float | None, _ack_wait_option] = None,
    replicas: Annotated[int | None, _replicas_option] = None,
    log_format: Annotated[LogFormat, _log_format_option] = LogFormat.JSON,
    log_level: Annotated[str, _log_level_option] = "info",
    *,
    nats: NatsOptions,
) -> None:
    """Run a worker service: it runs the step handlers of the APP's workflows.

    Serves until SIGTERM or SIGINT, then stops gracefully. Answers NATS service discovery as
    orch-worker.
    """
    level = _check_level(log_level)
    served = _load(spec)
    options = _queue_options(ack_wait, replicas)
    if max_deliver is not None:
        options["max_deliver"] = max_deliver

    async def build(transport: NatsTransport) -> Worker:
        return Worker(
            served.workflows,
            transport=transport,
            container=await served.container(container_spec),
            steps=steps or None,
            concurrency=concurrency,
            prefix=nats.prefix,
            partitions=nats.partitions,
            **options,
        )

    metadata = _metadata(nats.prefix, nats.partitions, served)
    if steps:
        metadata["steps"] = ",".join(steps)
    logs = (log_format, level)
    _execute(lambda: _serve("worker", nats, build, metadata, logs), nats)


class _DevServer(NatsServer):
    """A :class:`NatsServer` on a chosen port, with its store in a chosen directory."""

    def __init__(self, *, port: int | None, store: Path | None) -> None:
        super().__init__()
        # NatsServer picks a free port at its first start unless one is set; it has no
        # parameter for it (yet), so this sets the attribute it keeps the port in.
        self._port = port
        self._store = store

    @property
    def store_dir(self) -> Path:
        return self._store if self._store is not None else super().store_dir


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _up_banner(console: Console, url: str, served: App, prefix: str, store: str) -> None:
    flags = [] if url == DEFAULT_SERVERS else ["--servers", url]
    if prefix != "orch":
        flags += ["--prefix", prefix]
    workflow = served.names[0]
    console.print(Text("orchestrator dev stack", style="bold"))
    console.print(Text.assemble(("  NATS       ", "dim"), (url, "bold cyan")), soft_wrap=True)
    console.print(Text.assemble(("  JetStream  ", "dim"), store), soft_wrap=True)
    console.print(Text.assemble(("  prefix     ", "dim"), prefix))
    console.print(Text.assemble(("  workflows  ", "dim"), ", ".join(served.names)), soft_wrap=True)
    console.print(Text("start a workflow (in another terminal):", style="bold"))
    start = ["orchestrator", "start", workflow, *flags, "--input", '{"...": "..."}', "--wait"]
    for command in (
        start,
        ["orchestrator", "list", *flags],
        ["orchestrator", "watch", "TRANSACTION_ID", *flags],
    ):
        console.print(Text(f"  {shlex.join(command)}"), soft_wrap=True)
    console.print(Text("or from any NATS client:", style="bold"))
    nats_pub = ["nats", "pub", "-s", url, f"{prefix}.start.{workflow}", '{"input": {}}']
    console.print(Text(f"  {shlex.join(nats_pub)}"), soft_wrap=True)
    console.print(Text("Ctrl-C stops everything.", style="dim"))


@app.command()
def up(
    spec: Annotated[str, _app_argument],
    port: Annotated[
        int,
        typer.Option(
            "--port", "-p", min=0, max=65535, help="The NATS client port (0: any free port)."
        ),
    ] = 4222,
    store_dir: Annotated[
        Path | None,
        typer.Option(
            "--store-dir",
            metavar="DIR",
            file_okay=False,
            help="Keep JetStream's data here across runs (default: a temporary directory, "
            "removed on exit).",
            show_default=False,
        ),
    ] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", envvar="ORCH_PREFIX", help="Subject and stream prefix.")
    ] = "orch",
    partitions: Annotated[
        int, typer.Option("--partitions", envvar="ORCH_PARTITIONS", min=1, help="Partitions.")
    ] = 16,
    container_spec: Annotated[
        str | None,
        typer.Option(
            "--container",
            metavar="MODULE:ATTR",
            help="The workers' container. Default: the APP's make_container() or container.",
        ),
    ] = None,
    log_format: Annotated[LogFormat, _log_format_option] = LogFormat.CONSOLE,
    log_level: Annotated[str, _log_level_option] = "info",
) -> None:
    """A development stack in one process: a nats-server, a coordinator and a worker.

    Prints the NATS URL and how to start a workflow; Ctrl-C (or SIGTERM) stops everything.
    """
    level = _check_level(log_level)
    served = _load(spec)
    try:
        nats = NatsOptions.parse(prefix=prefix, partitions=partitions)
    except CliError as exc:
        _error(str(exc))
    if port and _port_in_use(port):
        _error(f"port {port} is in use (another nats-server?): choose one with --port, 0 for any")
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
    _configure_logging(log_format, level)
    _execute(lambda: _up(served, nats, port or None, store_dir, container_spec), nats)


async def _up(
    served: App, nats: NatsOptions, port: int | None, store: Path | None, container_spec: str | None
) -> int:
    log = structlog.get_logger("orchestrator.cli.up")
    server = _DevServer(port=port, store=store)
    async with _lifetime() as lifetime:
        try:
            await anyio.to_thread.run_sync(server.__enter__)
        except (OSError, RuntimeError, TimeoutError) as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            detail = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")
            raise TransportError(f"the nats-server did not start: {detail}") from None
        try:
            if lifetime.stopping.is_set():
                return lifetime.code
            container = await served.container(container_spec)
            prefix, partitions = nats.prefix, nats.partitions
            async with contextlib.AsyncExitStack() as stack:

                async def connected(kind: str) -> NatsTransport:
                    return await stack.enter_async_context(
                        NatsTransport(
                            server.url, name=f"orch-{kind}", closed_cb=lifetime.connection_closed
                        )
                    )

                to_coordinator = await connected("coordinator")
                coordinator = await stack.enter_async_context(
                    Coordinator(
                        served.workflows,
                        transport=to_coordinator,
                        prefix=prefix,
                        partitions=partitions,
                    )
                )
                to_worker = await connected("worker")
                worker = await stack.enter_async_context(
                    Worker(
                        served.workflows,
                        transport=to_worker,
                        container=container,
                        prefix=prefix,
                        partitions=partitions,
                    )
                )
                metadata = _metadata(prefix, partitions, served)
                for kind, service, transport in (
                    ("coordinator", coordinator, to_coordinator),
                    ("worker", worker, to_worker),
                ):
                    await stack.enter_async_context(
                        _discovery(
                            transport,
                            kind=kind,
                            prefix=prefix,
                            stats=service.stats,
                            metadata=metadata,
                        )
                    )
                kept = "kept" if store is not None else "temporary"
                store_text = f"{server.store_dir} ({kept})"
                _up_banner(Console(), server.url, served, prefix, store_text)
                log.info("ready", url=server.url, prefix=prefix, workflows=served.names)
                await lifetime.stopping.wait()
                log.info("stopping", reason=lifetime.reason)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.__exit__, None, None, None)
    if lifetime.interrupted:
        return EXIT_INTERRUPTED
    log.info("stopped", reason=lifetime.reason)
    return lifetime.code


# ------------------------------------------------------------------------------ clients
_json_option = typer.Option("--json", help="Print JSON instead of tables.")
_timeout_option = typer.Option(
    "--timeout", metavar="SECONDS", min=0, help="Stop waiting after this long."
)


def _print_json(value: Any) -> None:
    typer.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _outcome(result: WorkflowResult) -> int:
    failed = result.state in (TransactionState.REVERTED, TransactionState.FAILED)
    return EXIT_FAILED if failed else EXIT_OK


def _show(result: WorkflowResult, as_json: bool, tracebacks: bool = False) -> None:
    if as_json:
        _print_json(result)
    else:
        render_result(result, Console(), tracebacks=tracebacks)


@app.command()
@_with_nats(_CLIENT_CONNECT_TIMEOUT)
def start(
    workflow: Annotated[
        str, typer.Argument(metavar="WORKFLOW", help="The workflow's name.", show_default=False)
    ],
    input_json: Annotated[
        str,
        typer.Option(
            "--input",
            "-i",
            metavar="JSON",
            help="The workflow input as JSON; @FILE reads it from a file, - from stdin.",
        ),
    ] = "null",
    transaction_id: Annotated[
        str | None,
        typer.Option(
            "--transaction-id",
            "-t",
            metavar="ID",
            help="The transaction id (an existing one attaches to that transaction).",
        ),
    ] = None,
    context_json: Annotated[
        str | None,
        typer.Option("--context", metavar="JSON", help="The run's shared context: a JSON object."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", "-w", help="Wait until it finishes (or only waits on async steps)."),
    ] = False,
    timeout: Annotated[float | None, _timeout_option] = None,
    as_json: Annotated[bool, _json_option] = False,
    *,
    nats: NatsOptions,
) -> None:
    """Start a workflow; print its transaction id, and with --wait its result.

    Exit codes: 0 started (with --wait: done, or waiting on async steps), 1 reverted or failed,
    2 bad input (malformed JSON, an unknown workflow).
    """
    try:
        input_value = parse_json(input_json, "--input")
        context: dict[str, Any] | None = None
        if context_json is not None:
            context = parse_json(context_json, "--context")
            if not isinstance(context, dict):
                raise CliError(f"--context must be a JSON object, got {type(context).__name__}")
    except CliError as exc:
        _error(str(exc))

    async def body(client: Client) -> int:
        if not wait:
            handle = await client.start(
                workflow, input_value, transaction_id=transaction_id, context=context
            )
            if as_json:
                _print_json({"transaction_id": handle.transaction_id, "workflow": workflow})
            else:
                typer.echo(handle.transaction_id)
            return EXIT_OK
        tx = transaction_id or new_transaction_id(workflow)
        async with _lifetime(cancel=True) as lifetime:
            try:
                result = await client.run(
                    workflow,
                    input_value,
                    transaction_id=tx,
                    context=context,
                    throw_on_error=False,
                    timeout=timeout,
                )
            except TimeoutError:
                raise TimeoutError(
                    f"transaction {tx} did not settle within {timeout:g} s; it goes on "
                    f"(see: orchestrator status {tx})"
                ) from None
            _show(result, as_json)
            return _outcome(result)
        assert lifetime.interrupted
        _note(f"stopped waiting; transaction {tx} goes on (see: orchestrator status {tx})")
        return EXIT_INTERRUPTED

    _with_client(nats, body)


def _note(message: str) -> None:
    Console(stderr=True).print(Text(message, style="yellow"), soft_wrap=True)


_tx_argument = typer.Argument(
    metavar="TRANSACTION_ID", help="The transaction's id.", show_default=False
)


@app.command()
@_with_nats(_CLIENT_CONNECT_TIMEOUT)
def status(
    transaction_id: Annotated[str, _tx_argument],
    as_json: Annotated[bool, _json_option] = False,
    tracebacks: Annotated[
        bool, typer.Option("--tracebacks", help="Also print the tracebacks of the errors.")
    ] = False,
    *,
    nats: NatsOptions,
) -> None:
    """Show a transaction: its state, result, steps and errors.

    Exit codes: 0 done or still running, 1 reverted or failed, 2 no such transaction.
    """

    async def body(client: Client) -> int:
        result = await client.get(transaction_id)
        _show(result, as_json, tracebacks)
        return _outcome(result)

    _with_client(nats, body)


@app.command(name="list")
@_with_nats(_CLIENT_CONNECT_TIMEOUT)
def list_(
    workflow: Annotated[
        str | None, typer.Option("--workflow", "-W", metavar="NAME", help="Only this workflow.")
    ] = None,
    state: Annotated[
        TransactionState | None, typer.Option("--state", help="Only transactions in this state.")
    ] = None,
    as_json: Annotated[bool, _json_option] = False,
    *,
    nats: NatsOptions,
) -> None:
    """List live and retained transactions, oldest first."""

    async def body(client: Client) -> int:
        results = await client.list(workflow, state=state)
        results.sort(key=lambda r: (r.created_at or 0.0, r.transaction_id))
        if as_json:
            _print_json(results)
        else:
            Console().print(_list_table(results))
        return EXIT_OK

    _with_client(nats, body)


@app.command()
@_with_nats(_CLIENT_CONNECT_TIMEOUT)
def watch(
    transaction_id: Annotated[str, _tx_argument],
    *,
    nats: NatsOptions,
) -> None:
    """Follow a transaction's steps live until it finishes (Ctrl-C stops watching).

    Exit codes: 0 done, 1 reverted or failed, 2 no such transaction, 130 interrupted.
    """

    async def body(client: Client) -> int:
        console = Console()
        async with _lifetime(cancel=True) as lifetime:
            result = await _watch(client, transaction_id, console)
            return _outcome(result)
        assert lifetime.interrupted
        return EXIT_INTERRUPTED

    _with_client(nats, body)


@contextlib.asynccontextmanager
async def _events(
    client: Client, tx: str
) -> AsyncIterator[MemoryObjectReceiveStream[LifecycleEvent]]:
    """The transaction's lifecycle events from now on (subscribed on entry, before any read)."""
    send, receive = anyio.create_memory_object_stream[LifecycleEvent](math.inf)
    decoder = msgspec.json.Decoder(LifecycleEvent)

    def on_event(msg: Msg) -> None:
        with contextlib.suppress(msgspec.DecodeError, anyio.ClosedResourceError):
            send.send_nowait(decoder.decode(msg.data))

    subscription = await client.transport.subscribe(
        client.subjects.event_pattern(None, tx), on_event
    )
    try:
        with send, receive:
            yield receive
    finally:
        with anyio.CancelScope(shield=True):
            await subscription.unsubscribe()


async def _watch(client: Client, tx: str, console: Console) -> WorkflowResult:
    """Keep a live table of the steps, read again at every lifecycle event, until the end."""
    recent: deque[LifecycleEvent] = deque(maxlen=8)
    async with _events(client, tx) as events:
        result = await client.get(tx)
        _note(f"watching {tx} (Ctrl-C stops)")
        with Live(_watch_view(result, recent), console=console, auto_refresh=False) as live:
            while not result.state.finished:
                batch = [await events.receive()]
                with contextlib.suppress(anyio.WouldBlock):
                    while True:
                        batch.append(events.receive_nowait())
                recent.extend(batch)
                finish = next((e for e in batch if e.type == "finish"), None)
                try:
                    result = await client.get(tx)
                except TransactionNotFoundError:
                    if finish is None:
                        raise
                    # Finished and not retained: the last picture, with the final state.
                    result = msgspec.structs.replace(
                        result, state=TransactionState(finish.state or "done")
                    )
                live.update(_watch_view(result, recent), refresh=True)
        if not console.is_terminal:
            console.line()  # Live ends its last picture with a newline only on a terminal
    return result


async def _cancel(client: Client, tx: str, timeout: float | None) -> WorkflowResult:
    """Cancel, and wait for the compensation to finish."""
    async with _events(client, tx) as events:
        before = await client.get(tx)
        result = await client.cancel(tx, timeout=timeout)
        if before.state == TransactionState.DONE and result.state == TransactionState.DONE:
            # The engine API's cancel returns at the first finished picture, and a transaction
            # that was done already has one: wait for the finish of its compensation.
            try:
                with anyio.fail_after(timeout):
                    async for event in events:
                        if event.type == "finish" and event.state != TransactionState.DONE:
                            break
            except TimeoutError:
                raise TimeoutError(
                    f"the compensation of {tx} did not finish within {timeout:g} s; it goes on "
                    f"(see: orchestrator status {tx})"
                ) from None
            result = await client.get(tx)
    return result


@app.command()
@_with_nats(_CLIENT_CONNECT_TIMEOUT)
def cancel(
    transaction_id: Annotated[str, _tx_argument],
    timeout: Annotated[float | None, _timeout_option] = None,
    as_json: Annotated[bool, _json_option] = False,
    *,
    nats: NatsOptions,
) -> None:
    """Cancel a transaction: compensate what it did; print the outcome.

    Exit codes: 0 reverted, 1 a compensation failed, 2 no such transaction.
    """

    async def body(client: Client) -> int:
        result = await _cancel(client, transaction_id, timeout)
        _show(result, as_json)
        return EXIT_FAILED if result.state == TransactionState.FAILED else EXIT_OK

    _with_client(nats, body)


@app.command(name="complete-step")
@_with_nats(_CLIENT_CONNECT_TIMEOUT)
def complete_step(
    key: Annotated[
        str,
        typer.Argument(
            metavar="KEY",
            help="The step's idempotency key: WORKFLOW:TRANSACTION:STEP:invoke (or :compensate).",
            show_default=False,
        ),
    ],
    response_json: Annotated[
        str | None,
        typer.Option(
            "--response",
            "-r",
            metavar="JSON",
            help="Complete the step with this output (JSON; @FILE, - for stdin; default: null).",
            show_default=False,
        ),
    ] = None,
    fail: Annotated[
        str | None,
        typer.Option("--fail", metavar="MESSAGE", help="Fail the step with this error message."),
    ] = None,
    permanent: Annotated[
        bool,
        typer.Option("--permanent", help="With --fail: a permanent failure (no retries)."),
    ] = False,
    timeout: Annotated[float | None, _timeout_option] = None,
    as_json: Annotated[bool, _json_option] = False,
    *,
    nats: NatsOptions,
) -> None:
    """Complete an async step that awaits a response, or fail it; print what followed.

    Exit codes: 0 the step took the response, 2 bad input (malformed JSON, a key of no step
    awaiting a response, an unknown transaction).
    """
    try:
        if fail is not None and response_json is not None:
            raise CliError("give either --response or --fail, not both")
        if permanent and fail is None:
            raise CliError("--permanent goes with --fail MESSAGE")
        response = None if response_json is None else parse_json(response_json, "--response")
    except CliError as exc:
        _error(str(exc))

    async def body(client: Client) -> int:
        if fail is not None:
            result = await client.set_step_failure(
                key, fail, force_permanent=permanent, timeout=timeout
            )
        else:
            result = await client.set_step_success(key, response, timeout=timeout)
        _show(result, as_json)
        return EXIT_OK

    _with_client(nats, body)


@app.command()
@_with_nats(_CLIENT_CONNECT_TIMEOUT)
def hooks(
    workflow: Annotated[
        str, typer.Argument(metavar="WORKFLOW", help="The workflow's name.", show_default=False)
    ],
    hook: Annotated[
        str, typer.Argument(metavar="HOOK", help="The hook's name.", show_default=False)
    ],
    *,
    nats: NatsOptions,
) -> None:
    """Print each payload the hook publishes, one JSON line each, until Ctrl-C."""

    async def body(client: Client) -> int:
        send, receive = anyio.create_memory_object_stream[bytes](math.inf)
        subject = client.subjects.hook(workflow, hook)
        # Subscribed here rather than through client.hooks(), so "listening" is said only once
        # the server has the subscription.

        def on_payload(msg: Msg) -> None:
            with contextlib.suppress(anyio.ClosedResourceError):
                send.send_nowait(msg.data)

        subscription = await client.transport.subscribe(subject, on_payload)
        try:
            async with _lifetime(cancel=True):
                _note(f"listening on {subject} (Ctrl-C stops)")
                with send, receive:
                    async for data in receive:
                        try:
                            payload = msgspec.json.decode(data)
                        except msgspec.DecodeError:
                            _note(f"skipped a payload that is not JSON ({len(data)} bytes)")
                            continue
                        typer.echo(msgspec.json.encode(payload).decode())
        finally:
            with anyio.CancelScope(shield=True):
                await subscription.unsubscribe()
        return EXIT_OK

    _with_client(nats, body)


# ------------------------------------------------------------------------------ logging
def _configure_logging(fmt: LogFormat | None = None, level: int = logging.INFO) -> None:
    """Where logs go: stderr, so stdout carries only the command's output.

    Without a format (``run`` and the client commands), structlog's defaults on stderr. The
    services render structlog's events and the standard library's records (the transport,
    nats-py) alike: JSON lines, or readable lines for a terminal.
    """
    if fmt is None:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
        return
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Any]
    if fmt is LogFormat.JSON:
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: ``orchestrator``."""
    _configure_logging()
    app(args=list(argv) if argv is not None else None, prog_name="orchestrator")


if __name__ == "__main__":
    main()
