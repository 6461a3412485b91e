"""The actor runtime: dispatcher fairness, actor turns, supervision, engine lifecycle."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from actors import Actor, ActorSystem, Directive, MemoryStore
from orchestrator import LocalEngine, WorkflowFailedError, create_step, create_workflow
from orchestrator._transaction import TxState

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_job_that_awaits_does_not_hold_up_the_others() -> None:
    async with ActorSystem() as system:
        release = anyio.Event()
        done = anyio.Event()

        async def blocker() -> None:
            await release.wait()

        async def quick() -> None:
            done.set()

        system.dispatcher.submit(blocker)
        system.dispatcher.submit(quick)
        with anyio.fail_after(5):
            await done.wait()
        release.set()


async def test_jobs_from_outside_the_pool_start_while_the_running_ones_await() -> None:
    # Jobs submitted by other tasks (a connection's reading task) while every running job
    # awaits, interleaved with jobs that submit jobs themselves: every one starts while the
    # first ones still wait, and none is lost (a worker on its way takes the queue, so a wake
    # that never comes would leave jobs queued for good).
    async with ActorSystem() as system:
        dispatcher = system.dispatcher
        release = anyio.Event()
        started: list[str] = []
        all_in = anyio.Event()
        expected = 3 + 40 + 40

        def note(name: str) -> None:
            started.append(name)
            if len(started) == expected:
                all_in.set()

        async def waiting(name: str) -> None:
            note(name)
            await release.wait()

        async def spawning(name: str) -> None:
            note(name)
            dispatcher.submit(waiting, name + "/child")  # from inside the pool
            await anyio.lowlevel.checkpoint()

        for i in range(3):
            dispatcher.submit(waiting, f"held-{i}")
        await anyio.lowlevel.checkpoint()
        for i in range(40):  # from this task, outside the pool
            dispatcher.submit(spawning, f"outside-{i}")
            for _ in range(i % 3):
                await anyio.lowlevel.checkpoint()
        with anyio.fail_after(5):
            await all_in.wait()
        release.set()
    assert sorted(started) == sorted(
        [f"held-{i}" for i in range(3)]
        + [f"outside-{i}" for i in range(40)]
        + [f"outside-{i}/child" for i in range(40)]
    )


class _Recorder(Actor[int]):
    def __init__(self) -> None:
        super().__init__("recorder")
        self.seen: list[int] = []
        self.active = 0
        self.max_active = 0
        self.got = anyio.Event()

    async def on_message(self, message: int) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await anyio.lowlevel.checkpoint()
        self.seen.append(message)
        self.active -= 1
        if len(self.seen) == 20:
            self.got.set()


async def test_an_actor_handles_one_message_at_a_time_in_order() -> None:
    async with ActorSystem() as system:
        actor = _Recorder()
        system.spawn(actor)
        for i in range(20):
            actor.tell(i)
        with anyio.fail_after(5):
            await actor.got.wait()
    assert actor.seen == list(range(20))
    assert actor.max_active == 1


class _Crashy(Actor[str]):
    def __init__(self) -> None:
        super().__init__("crashy")
        self.restarts = 0
        self.handled: list[str] = []
        self.ok = anyio.Event()

    async def on_message(self, message: str) -> None:
        if message == "boom":
            raise RuntimeError("boom")
        self.handled.append(message)
        self.ok.set()

    async def on_failure(self, messages: list[str], exc: Exception) -> Directive:
        return Directive.RESTART

    async def on_restart(self) -> None:
        self.restarts += 1


async def test_a_failing_actor_is_restarted_and_goes_on() -> None:
    async with ActorSystem() as system:
        actor = _Crashy()
        system.spawn(actor)
        actor.tell("boom")
        actor.tell("after")
        with anyio.fail_after(5):
            await actor.ok.wait()
    assert actor.restarts == 1
    assert actor.handled == ["after"]


class _FlakyStore(MemoryStore):
    """Fails the first ``failures`` checkpoints, as a store that lost its connection would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def save(self, state: TxState) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("store unavailable")
        await super().save(state)


async def _inc(x: dict[str, int]) -> dict[str, int]:
    return {"i": x["i"] + 1}


step_a = create_step("sup-a", _inc)
step_b = create_step("sup-b", _inc)


@create_workflow("supervised")
def supervised(input: Any) -> Any:
    return step_b(step_a(input))


async def test_a_coordinator_whose_checkpoint_fails_restarts_from_the_store() -> None:
    async with LocalEngine([supervised], store=_FlakyStore(failures=2)) as engine:
        with anyio.fail_after(10):
            result = await engine.run(supervised, {"i": 0})
    assert result.state.value == "done"
    assert result.result == {"i": 2}


async def test_a_workflow_failure_escapes_the_engine_block_unwrapped() -> None:
    @create_step("always-fails")
    async def fails(x: Any) -> None:
        raise RuntimeError("nope")

    @create_workflow("fails-once")
    def wf(input: Any) -> Any:
        return fails(input)

    with pytest.raises(WorkflowFailedError):
        async with LocalEngine([wf]) as engine:
            await engine.run(wf, {})
