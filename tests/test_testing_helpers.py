"""orchestrator.testing: the helpers users get for their own tests."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import create_step, create_workflow
from orchestrator.testing import capture_logs, distributed, local_engine

pytestmark = pytest.mark.anyio


async def _double(x: int) -> int:
    return x * 2


double = create_step("helper-double", _double)


@create_workflow("helper-flow")
def flow(input: Any) -> Any:
    return double(input)


async def test_local_engine_helper() -> None:
    async with local_engine([flow]) as engine:
        assert (await engine.run(flow, 4)).result == 8


async def test_distributed_in_memory() -> None:
    async with distributed([flow]) as client:
        assert (await client.run("helper-flow", 5)).result == 10


async def test_distributed_over_nats(nats_server: Any) -> None:
    async with distributed([flow], url=nats_server.url) as client:
        assert (await client.run("helper-flow", 6)).result == 12


def test_capture_logs_is_structlogs() -> None:
    import structlog

    with capture_logs() as logs:
        structlog.get_logger().info("hello", where="test")
    assert logs == [{"event": "hello", "where": "test", "log_level": "info"}]
