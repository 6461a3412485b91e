"""Fixtures shared by the behaviour tests (DESIGN.md section 3, through the public API).

Every test gets its engine from ``make_engine``, parametrised by mode: only ``"local"`` for now;
a later issue adds ``"nats"`` (services on a real nats-server) and the same tests run there.

No module here is a package (there is no ``tests/__init__.py``): helpers are handed out as
fixtures so nothing needs importing across test modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from actors import KvStore
from orchestrator import LocalEngine, Step, StepContext, create_step
from orchestrator.testing import distributed
from transport import MemoryTransport

MODES = ["local", "local-kv", "services", "nats"]
"""``local``: LocalEngine as users get it; ``local-kv``: the same, keeping transactions in the
key-value store the NATS services use (over the memory transport); ``services``: a coordinator
service, a worker service and a client, talking over one memory transport as they do over NATS;
``nats``: the same services and client, each with its own connection to a real nats-server."""


DEADLINE = 5.0
"""Seconds any single wait in a behaviour test may take before the test fails."""


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio (the backend the services use)."""
    return "asyncio"


@pytest.fixture(params=MODES, ids=[f"mode={m}" for m in MODES])
def engine_mode(request: pytest.FixtureRequest) -> str:
    """The mode the engine runs in (``local``; later also ``nats``)."""
    return str(request.param)


@pytest.fixture
def workflow_timeout(engine_mode: str) -> float:
    """A workflow ``timeout`` that the steps before the one meant to time out always meet: over
    NATS a step takes milliseconds (and more on a loaded machine), in memory microseconds."""
    return 1.0 if engine_mode == "nats" else 0.2


@pytest.fixture
def make_engine(
    engine_mode: str, request: pytest.FixtureRequest
) -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """``async with make_engine(workflows, container=None, **kw) as engine:``."""

    @contextlib.asynccontextmanager
    async def factory(
        workflows: Any, container: Any = None, **kw: Any
    ) -> AsyncIterator[LocalEngine]:
        if engine_mode == "local":
            async with LocalEngine(workflows=list(workflows), container=container, **kw) as engine:
                yield engine
        elif engine_mode == "local-kv":
            transport = MemoryTransport()
            store = KvStore(transport)
            async with LocalEngine(
                workflows=list(workflows),
                container=container,
                transport=transport,
                store=store,
                **kw,
            ) as engine:
                yield engine
        elif engine_mode in ("services", "nats"):
            url = request.getfixturevalue("nats_server").url if engine_mode == "nats" else None
            async with distributed(workflows, container, url=url, **kw) as client:
                yield client
        else:  # pragma: no cover - added with the NATS mode
            raise NotImplementedError(engine_mode)

    return factory


# ------------------------------------------------------------------------------ recording
@dataclasses.dataclass
class Kit:
    """A per-test effect log and a builder of steps that record into it.

    ``log`` gets ``"<name>"`` for every invoke attempt and ``"c:<name>"`` for every compensation
    attempt; ``comp_inputs[name]`` is what the last compensation of ``name`` received.
    """

    log: list[str] = dataclasses.field(default_factory=list)
    comp_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    attempts: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def container(self) -> dict[str, Any]:
        return {"log": self.log}

    async def logged(self, entry: str, timeout: float = DEADLINE) -> None:
        """Wait until ``entry`` is in the log: an async step's handler runs in the background,
        so ``run`` may return before it has (over NATS it usually does)."""
        with anyio.fail_after(timeout):
            while entry not in self.log:  # noqa: ASYNC110 - the log is all handlers leave
                await anyio.sleep(0.005)

    def step(
        self,
        name: str,
        *,
        fail: bool | int = False,
        compensate: bool = True,
        comp_fail: bool | int = False,
        output: Any = dataclasses.MISSING,
        **config: Any,
    ) -> Step:
        """A step that logs its calls.

        ``fail``: True fails every attempt, an int fails that many first attempts (RuntimeError).
        ``comp_fail``: the same for the compensation. The output is ``output`` when given, else
        ``{"step": name, "input": <input>}``.
        """
        log, comp_inputs, attempts = self.log, self.comp_inputs, self.attempts

        def failing(setting: bool | int, attempt: int) -> bool:
            if setting is True:
                return True
            return bool(setting) and attempt <= int(setting)

        async def invoke(data: Any, ctx: StepContext) -> Any:
            log.append(name)
            attempts.setdefault(name, []).append(ctx.attempt)
            if failing(fail, ctx.attempt):
                raise RuntimeError(f"{name} failed on attempt {ctx.attempt}")
            if output is not dataclasses.MISSING:
                return output
            return {"step": name, "input": data}

        async def undo(data: Any, ctx: StepContext) -> None:
            log.append(f"c:{name}")
            comp_inputs[name] = data
            if failing(comp_fail, ctx.attempt):
                raise RuntimeError(f"compensation of {name} failed on attempt {ctx.attempt}")

        return create_step(name, invoke, undo if compensate else None, **config)


@pytest.fixture
def kit() -> Kit:
    """A fresh effect log and step builder for one test."""
    return Kit()


# ------------------------------------------------------------------------------ watching
class Collector:
    """Items from an async iterator (events, hook payloads), gathered by a background task."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = anyio.Event()

    def _add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(
        self, predicate: Callable[[list[Any]], bool], timeout: float = DEADLINE
    ) -> list[Any]:
        """Wait (with a deadline) until ``predicate(items)`` holds; the items."""
        with anyio.fail_after(timeout):
            while not predicate(self.items):
                await self._changed.wait()
        return self.items


@pytest.fixture
def collect(
    engine_mode: str,
) -> Callable[
    [Callable[[], AsyncIterator[Any]]], contextlib.AbstractAsyncContextManager[Collector]
]:
    """``async with collect(lambda: engine.events(...)) as box:`` gathers items into ``box``.

    The block body starts once the subscription is live, so nothing published afterwards is
    missed; leaving the block stops the subscription.
    """

    @contextlib.asynccontextmanager
    async def collecting(source: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Collector]:
        box = Collector()

        async def pump() -> None:
            async for item in source():
                box._add(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            # Local mode subscribes in-process: once every task is blocked, the pump is
            # subscribed and waiting for its first item.
            with anyio.fail_after(DEADLINE):
                await anyio.wait_all_tasks_blocked()
            try:
                yield box
            finally:
                tg.cancel_scope.cancel()

    return collecting


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[Any]]:
    """``await wait_until(async_fn, predicate)``: poll ``async_fn()`` until ``predicate`` holds.

    For conditions that have no event to wait on (the state seen by ``engine.get``); polls with
    a short back-off and fails after the deadline.
    """

    async def waiting(
        fetch: Callable[[], Awaitable[Any]],
        predicate: Callable[[Any], bool],
        timeout: float = DEADLINE,
    ) -> Any:
        with anyio.fail_after(timeout):
            while True:
                value = await fetch()
                if predicate(value):
                    return value
                await anyio.sleep(0.005)

    return waiting
