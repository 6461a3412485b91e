"""The ``orchestrator`` command line.

Commands:

- ``orchestrator run MODULE:WORKFLOW --input JSON``: run a workflow in this process on a
  :class:`~orchestrator.LocalEngine`, print its result as JSON, a table of its steps and, for a
  failed run, its errors. Exit code 0 for ``done`` (and for a run that waits on async steps),
  1 for ``reverted`` / ``failed``, 2 for bad input (an unknown module or workflow, malformed JSON).
- ``orchestrator graph MODULE:WORKFLOW [--format mermaid|dot]``: print the workflow's graph.

``MODULE`` is imported with the current directory on ``sys.path``; ``WORKFLOW`` is an attribute
of it made by :func:`~orchestrator.create_workflow` (or the workflow's name). The container for
``run`` is ``--container MODULE:ATTR`` when given, else the module's ``make_container()`` factory
or its ``container`` attribute.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, NoReturn

import anyio
import msgspec
import structlog
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._composer import Workflow
from ._errors import ConfigurationError, OrchestratorError
from ._graph import Graph, Node
from ._local import LocalEngine
from ._types import StepState, TransactionState, WorkflowResult

__all__ = [
    "CliError",
    "GraphFormat",
    "app",
    "awaiting_keys",
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

app = typer.Typer(
    name="orchestrator",
    help="Run and inspect workflows with compensation (sagas).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class CliError(Exception):
    """Bad input to a command: reported on one line, exit code 2."""


class GraphFormat(enum.StrEnum):
    """The output formats of ``graph``."""

    MERMAID = "mermaid"
    DOT = "dot"


# ------------------------------------------------------------------------------ loading
def _import_module(name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise CliError(
                f"cannot import module {name!r}: no module named {missing!r} "
                f"(searched the current directory {cwd} and sys.path)"
            ) from None
        raise CliError(f"importing module {name!r} failed: {_describe_exc(exc)}") from None
    except Exception as exc:
        raise CliError(f"importing module {name!r} failed: {_describe_exc(exc)}") from None


def _describe_exc(exc: BaseException) -> str:
    """``Type: message (at file:line)``, where the line is the innermost frame."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" (at {exc.filename}:{exc.lineno})"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _split_spec(spec: str, what: str) -> tuple[str, str | None]:
    module, sep, attr = spec.strip().partition(":")
    if not module or (sep and not attr):
        raise CliError(f"{what} must look like MODULE:ATTRIBUTE (e.g. examples.shop:checkout)")
    return module, attr or None


def _lookup(module: ModuleType, path: str) -> Any:
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _workflows_in(module: ModuleType) -> dict[str, Workflow]:
    return {k: v for k, v in vars(module).items() if isinstance(v, Workflow)}


def load_workflow(spec: str) -> Workflow:
    """The workflow named by ``MODULE:WORKFLOW`` (``MODULE`` alone when it has exactly one).

    ``WORKFLOW`` is an attribute path in the module, or the name given to ``create_workflow``.
    """
    module_name, attr = _split_spec(spec, "the workflow")
    module = _import_module(module_name)
    found = _workflows_in(module)
    listing = ", ".join(sorted(found)) or "none"
    if attr is None:
        if len(found) == 1:
            return next(iter(found.values()))
        raise CliError(
            f"module {module_name!r} defines {len(found)} workflows ({listing}); "
            f"name one: {module_name}:WORKFLOW"
        )
    try:
        value = _lookup(module, attr)
    except AttributeError:
        by_name = [wf for wf in found.values() if wf.name == attr]
        if len(by_name) == 1:
            return by_name[0]
        raise CliError(
            f"module {module_name!r} has no attribute {attr!r}; workflows in it: {listing}"
        ) from None
    if not isinstance(value, Workflow):
        raise CliError(
            f"{module_name}:{attr} is a {type(value).__name__}, not a workflow "
            f"(made by create_workflow); workflows in {module_name!r}: {listing}"
        )
    return value


def _is_container(value: Any) -> bool:
    return isinstance(value, Mapping) or hasattr(value, "resolve")


async def _call_factory(factory: Any, where: str) -> Any:
    try:
        value = factory()
        if inspect.isawaitable(value):
            value = await value
    except Exception as exc:
        raise CliError(f"the container factory {where} failed: {_describe_exc(exc)}") from None
    return value


async def load_container(workflow_module: str, spec: str | None) -> Any:
    """The container for a run: ``--container MODULE:ATTR``, else the workflow's module's.

    An attribute that is a mapping or has ``resolve(name)`` is used as is; any other callable is
    a factory, called (and awaited when it returns an awaitable). Without ``--container`` the
    module's ``make_container()`` factory wins over its ``container`` attribute; neither means
    an empty container.
    """
    if spec is not None:
        module_name, attr = _split_spec(spec, "--container")
        if attr is None:
            raise CliError("--container must look like MODULE:ATTRIBUTE")
        module = _import_module(module_name)
        try:
            value = _lookup(module, attr)
        except AttributeError:
            raise CliError(
                f"--container: module {module_name!r} has no attribute {attr!r}"
            ) from None
        where = f"{module_name}:{attr}"
    else:
        module = _import_module(workflow_module)
        if callable(getattr(module, "make_container", None)):
            value, where = module.make_container, f"{workflow_module}:make_container"
        elif hasattr(module, "container"):
            value, where = module.container, f"{workflow_module}:container"
        else:
            return None
    if not _is_container(value) and callable(value):
        value = await _call_factory(value, where)
    if value is not None and not _is_container(value):
        raise CliError(
            f"{where} ({type(value).__name__}) is not a container: a container is a mapping, "
            "has a resolve(name) method, or is a factory that returns one"
        )
    return value


def _parse_json(text: str, option: str) -> Any:
    source = text
    if text == "-":
        source = sys.stdin.read()
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{option}: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        raise CliError(f"{option} is not valid JSON: {exc}") from None


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
    header = Text.assemble(
        ("workflow ", "dim"),
        (result.workflow, "bold"),
        ("  transaction ", "dim"),
        result.transaction_id,
        ("  state ", "dim"),
        (state.value, _TX_STYLE.get(state, "bold")),
    )
    console.print(header, soft_wrap=True)
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


def _json(result: WorkflowResult) -> str:
    return msgspec.json.format(msgspec.json.encode(result), indent=2).decode()


def _error(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err = Console(stderr=True)
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


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
        input_value = _parse_json(input_json, "--input")
        context: dict[str, Any] | None = None
        if context_json is not None:
            parsed = _parse_json(context_json, "--context")
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


def _configure_logging() -> None:
    # Step and engine logs go to stderr, so stdout carries only the command's output.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: ``orchestrator``."""
    _configure_logging()
    app(args=list(argv) if argv is not None else None, prog_name="orchestrator")


if __name__ == "__main__":
    main()
