"""``orchestrator graph``: Mermaid and DOT output of a workflow's graph."""

from __future__ import annotations

import re

import pytest
import structlog
from typer.testing import CliRunner

from orchestrator import (
    WorkflowData,
    WorkflowResponse,
    create_hook,
    create_step,
    create_workflow,
    parallelize,
    when,
)
from orchestrator.cli import app, main, to_dot, to_mermaid

SHOP_STEPS = (
    "reserve-inventory",
    "charge-payment",
    "create-order",
    "add-free-gift",
    "send-confirmation",
    "update-loyalty-points",
)


@create_step("g-first")
async def g_first(data: object, ctx: object) -> object:
    return data


@create_step('g-"odd"<name>')
async def g_odd(data: object, ctx: object) -> object:
    return data


@create_step("g-wait", async_=True, max_retries=1)
async def g_wait(data: object, ctx: object) -> object:
    return data


g_child = create_workflow("g-child", lambda inp: g_first(inp))


@create_workflow("g-parent")
def g_parent(inp: WorkflowData) -> WorkflowResponse:
    first = g_first(inp)
    inner = when("outer", first, lambda v: True).then(
        lambda: when("inner", first, lambda v: True).then(lambda: g_odd(first))
    )
    hook = create_hook("g-hook", {"x": first})
    child = g_child.run_as_step(inner)
    left, right = parallelize(g_wait(child), g_odd(child).config(name="g-right"))
    return WorkflowResponse({"left": left, "right": right}, hooks=[hook])


@g_parent.hooks["g-hook"]
async def g_handler(payload: object, ctx: object) -> None:
    return None


def test_graph_mermaid_by_default(runner: CliRunner) -> None:
    result = runner.invoke(app, ["graph", "examples.shop:checkout"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("flowchart TD\n")
    for step in SHOP_STEPS:
        assert f'["{step}<br/>step' in out
    assert 'subgraph w0 ["when free-gift"]' in out
    assert "input --> n0" in out
    assert "n0 --> n1" in out
    # send-confirmation and update-loyalty-points run in parallel after the gift step
    assert "n3 --> n4" in out
    assert "n3 --> n5" in out
    assert "n4 --> result" in out
    assert "n5 --> result" in out


def test_graph_dot(runner: CliRunner) -> None:
    result = runner.invoke(app, ["graph", "examples.shop:checkout", "--format", "dot"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith('digraph "checkout" {')
    assert out.rstrip().endswith("}")
    for step in SHOP_STEPS:
        assert f'[label="{step}\\nstep' in out
    assert "subgraph cluster_0 {" in out
    assert 'label="when free-gift";' in out
    assert "n2 -> n3;" in out
    assert out.count("{") == out.count("}")


def test_graph_approval_marks_the_async_step(runner: CliRunner) -> None:
    result = runner.invoke(app, ["graph", "examples.approval:approval", "-f", "mermaid"])
    assert result.exit_code == 0
    assert 'n1["await-approval<br/>step · async"]' in result.stdout


def test_graph_unknown_format_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["graph", "examples.shop:checkout", "--format", "svg"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_graph_unknown_workflow(runner: CliRunner) -> None:
    result = runner.invoke(app, ["graph", "examples.shop:nope"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: module 'examples.shop' has no attribute 'nope'; workflows in it: checkout"
    )


def test_mermaid_kinds_nested_blocks_and_escaping() -> None:
    out = to_mermaid(g_parent.graph)
    lines = out.splitlines()
    assert lines[0] == "flowchart TD"
    assert 'subgraph w0 ["when outer"]' in out
    assert '        subgraph w1 ["when inner"]' in out  # nested inside "outer"
    assert '            n1["g-#quot;odd#quot;#lt;name#gt;<br/>step"]' in lines
    assert 'n2{{"g-hook<br/>hook"}}' in out
    assert 'n3["g-hook-g_handler<br/>step"]' in out
    assert 'n4[["g-child-as-step<br/>subflow g-child"]]' in out
    assert 'n5["g-wait<br/>step · async · retries=1"]' in out
    assert "n4 --> n5" in out
    assert "n4 --> n6" in out
    # every node is declared once and every edge names declared nodes
    declared = set(re.findall(r"^\s*(n\d+)[\[{(]", out, re.MULTILINE)) | {"input", "result"}
    assert len(declared) == len(g_parent.graph.nodes) + 2
    for a, b in re.findall(r"^\s*(\w+) --> (\w+)$", out, re.MULTILINE):
        assert {a, b} <= declared


def test_dot_kinds_nested_clusters_and_escaping() -> None:
    out = to_dot(g_parent.graph)
    assert out.startswith('digraph "g-parent" {')
    assert 'label="g-\\"odd\\"<name>\\nstep"' in out
    assert "shape=hexagon" in out
    assert "shape=component" in out
    assert out.index("subgraph cluster_0") < out.index("subgraph cluster_1")
    assert out.count("{") == out.count("}")
    edges = re.findall(r"^\s*(\w+) -> (\w+);$", out, re.MULTILINE)
    after = sum(max(1, len(n.after)) for n in g_parent.graph.nodes)
    assert len(edges) == after + 2  # plus the two last steps to "result"


def test_main_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["graph", "examples.shop:checkout", "--format", "dot"])
    finally:
        structlog.reset_defaults()  # main() sends logs to stderr
    assert exit_info.value.code == 0
    assert "create-order" in capsys.readouterr().out
