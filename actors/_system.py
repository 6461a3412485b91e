"""The actor runtime: mailboxes, actors that handle one message at a time, supervision."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

__all__ = ["Actor", "ActorSystem", "Directive", "Dispatcher", "Mailbox", "Signal"]

M = TypeVar("M")
log = structlog.get_logger("actors")


class Signal:
    """A one-shot wake-up for ONE waiting task: an asyncio future.

    ``anyio.Event`` looks up the running backend on creation and the loop on every wait; on the
    hot path (an idle dispatcher worker, a caller waiting for its run) that was about a seventh
    of the time of a workflow, so this runtime, which needs asyncio anyway, uses the future
    directly. Cancelling the waiting task cancels the future; ``set`` is then a no-op.
    """

    __slots__ = ("_future", "_late")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._late = False

    def set(self) -> None:
        """Wake the waiter (idempotent)."""
        if not self._future.done():
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._future.done()

    async def wait(self) -> None:
        """Wait until :meth:`set` is called."""
        await self._future

    async def wait_for(self, timeout: float) -> bool:
        """:meth:`wait`, for at most ``timeout`` seconds: whether it was set in time (a
        timer, not a cancel scope: this is on the path of every API start)."""
        future = self._future
        if not future.done():
            timer = future.get_loop().call_later(timeout, self._expire)
            try:
                await future
            finally:
                timer.cancel()
        return not self._late

    def _expire(self) -> None:
        if not self._future.done():
            self._late = True
            self._future.set_result(None)


class Mailbox(Generic[M]):
    """An unbounded FIFO of messages with one reader.

    A deque plus a :class:`Signal` armed only while the reader waits. anyio's memory
    object streams make every ``receive`` a scheduling checkpoint, which doubled the event-loop
    wake-ups per message on the hot path; this keeps one wake-up per idle-to-busy transition and
    none while messages are queued (see docs/architecture.md).
    """

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[M] = deque()
        self._waiter: Signal | None = None
        self._closed = False

    def send(self, item: M) -> None:
        """Queue ``item`` (never blocks)."""
        if self._closed:
            raise anyio.ClosedResourceError
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def get_nowait(self) -> M | None:
        """The next item, or ``None`` when the mailbox is empty."""
        return self._items.popleft() if self._items else None

    def drain(self) -> list[M]:
        """Every queued item, oldest first; the mailbox is empty afterwards."""
        items = list(self._items)
        self._items.clear()
        return items

    async def get(self) -> M:
        """The next item, waiting for one; ``EndOfStream`` once closed and drained."""
        while not self._items:
            if self._closed:
                raise anyio.EndOfStream
            waiter = self._waiter = Signal()
            await waiter.wait()
        return self._items.popleft()

    def close(self) -> None:
        """No more items; the reader drains what is queued, then gets ``EndOfStream``."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def __len__(self) -> int:
        return len(self._items)


class Directive(enum.Enum):
    """What the supervisor does with an actor whose handler raised."""

    RESUME = "resume"
    """Keep the actor and go on with the next message."""
    RESTART = "restart"
    """Call ``on_restart`` (reload state from the store), then go on."""
    STOP = "stop"
    """Stop the actor; its queued messages are dropped (work messages are redelivered)."""
    ESCALATE = "escalate"
    """Re-raise: the actor system's task group fails."""


class Dispatcher:
    """Runs jobs (actor turns, step invocations) on a pool of long-lived worker tasks.

    Like the dispatchers of Akka or Orleans: an actor with messages is scheduled as a job, and
    whichever worker is free runs its turn. A job costs a deque append; a worker that finishes a
    job takes the next one without going back to the event loop. A job submitted while a worker
    runs is left to that worker, unless it is still queued when the event loop next gets control
    (the running job awaited something): then an idle worker is woken, or a new one started, so
    a handler that awaits for a long time never holds up the others. Idle workers beyond
    ``keep_idle`` exit. A job submitted from outside the pool (a message read off a socket) while
    every running job awaits wakes an idle worker at once: waiting for the next turn of the loop
    to see whether a running worker takes it cost each hop of a workflow a loop turn. Needs the
    asyncio backend (for ``call_soon``), as nats-py does.
    """

    def __init__(self, task_group: TaskGroup, *, keep_idle: int = 16) -> None:
        self._tg = task_group
        self._jobs: deque[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = deque()
        self._idle: deque[Signal] = deque()
        self._workers = 0
        self._running = 0
        self._check_pending = False
        self._waking = False
        """A worker was woken (or started) and has not run yet: it takes what is queued."""
        self._tasks: set[asyncio.Task[Any] | None] = set()
        self._keep_idle = keep_idle
        self._loop = asyncio.get_running_loop()

    @property
    def workers(self) -> int:
        """How many worker tasks exist now."""
        return self._workers

    def submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``await fn(*args)`` on a worker; ``fn`` handles its own errors."""
        self._jobs.append((fn, args))
        if self._waking:
            return
        if self._running == 0 or asyncio.current_task() not in self._tasks:
            self._wake()
        else:  # left to the worker running now, unless it awaits before it gets to it
            self._check_soon()

    def _check_soon(self) -> None:
        if not self._check_pending:
            self._check_pending = True
            self._loop.call_soon(self._check)

    def _check(self) -> None:
        self._check_pending = False
        if self._jobs:
            self._wake()

    def _wake(self) -> None:
        self._waking = True
        if self._idle:
            self._idle.popleft().set()
        else:
            self._workers += 1
            self._tg.start_soon(self._work, name="dispatcher worker")

    async def _work(self) -> None:
        jobs = self._jobs
        idle = self._idle
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                self._waking = False
                while jobs:
                    fn, args = jobs.popleft()
                    if jobs:
                        self._check_soon()
                    self._running += 1
                    try:
                        await fn(*args)
                    except Exception:
                        log.exception("dispatcher job failed", job=getattr(fn, "__qualname__", fn))
                    finally:
                        self._running -= 1
                if len(idle) >= self._keep_idle:
                    return
                waiter = Signal()
                idle.append(waiter)
                await waiter.wait()
        finally:
            self._workers -= 1
            self._tasks.discard(task)


class Actor(Generic[M]):
    """An actor owns its state and a mailbox and handles one message at a time.

    ``tell`` queues a message; an actor with messages is scheduled once on the system's
    dispatcher, which runs its turn: the messages queued, one by one.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.mailbox: Mailbox[M] = Mailbox()
        self._dispatcher: Dispatcher | None = None
        self._scheduled = False
        self._stopped = False

    async def on_message(self, message: M) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def on_batch(self, messages: list[M]) -> None:
        """Handle the messages queued since the last turn (default: one by one).

        An actor may override this to apply several messages and persist once.
        """
        for message in messages:
            await self.on_message(message)

    async def on_failure(self, messages: list[M], exc: Exception) -> Directive:
        """Supervision policy for this actor (default: log and restart)."""
        log.error("actor failed", actor=self.name, exc_info=exc)
        return Directive.RESTART

    async def on_restart(self) -> None:
        """Reset in-memory state after a failure (default: nothing)."""

    def idle(self) -> bool:
        """Called when the mailbox is empty: return True to stop (passivate) the actor now."""
        return False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def tell(self, message: M) -> None:
        """Queue ``message`` (never blocks)."""
        if self._stopped:
            raise anyio.ClosedResourceError(f"actor {self.name} is stopped")
        self.mailbox.send(message)
        if not self._scheduled:
            dispatcher = self._dispatcher
            if dispatcher is None:
                raise RuntimeError(f"actor {self.name} was never spawned")
            self._scheduled = True
            dispatcher.submit(self._turn)

    def stop(self) -> None:
        """Stop now; queued messages are dropped (their work messages get redelivered)."""
        self._stopped = True
        self.mailbox.close()

    async def _turn(self) -> None:
        mailbox = self.mailbox
        items = mailbox._items
        # An actor that handles messages one by one gets batches of one, so a failure concerns
        # that message only and the ones after it stay queued.
        one_by_one = type(self).on_batch is Actor.on_batch
        try:
            while items and not self._stopped:
                batch = [items.popleft()] if one_by_one else mailbox.drain()
                try:
                    await self.on_batch(batch)
                except Exception as exc:
                    directive = await self.on_failure(batch, exc)
                    if directive is Directive.ESCALATE:
                        raise
                    if directive is Directive.STOP:
                        self.stop()
                    elif directive is Directive.RESTART:
                        await self.on_restart()
        finally:
            self._scheduled = False
        if not self._stopped and self.idle():
            self.stop()


class ActorSystem:
    """Actors and helper tasks in one task group (``async with ActorSystem() as system``)."""

    def __init__(self, *, keep_idle: int = 16) -> None:
        self._tg: TaskGroup | None = None
        self._cm: Any = None
        self._dispatcher: Dispatcher | None = None
        self._keep_idle = keep_idle

    async def __aenter__(self) -> ActorSystem:
        self._cm = anyio.create_task_group()
        self._tg = await self._cm.__aenter__()
        self._dispatcher = Dispatcher(self._tg, keep_idle=self._keep_idle)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        # The body's own exception is not handed to the task group (which would wrap it in an
        # ExceptionGroup): it propagates as it is once the workers are cancelled.
        try:
            await self._cm.__aexit__(None, None, None)
        finally:
            self._tg = None
            self._dispatcher = None

    @property
    def task_group(self) -> TaskGroup:
        """The group every worker and helper task of this system runs in."""
        if self._tg is None:
            raise RuntimeError("the actor system is not running (use `async with`)")
        return self._tg

    @property
    def dispatcher(self) -> Dispatcher:
        """The pool that runs actor turns and other short jobs."""
        if self._dispatcher is None:
            raise RuntimeError("the actor system is not running (use `async with`)")
        return self._dispatcher

    def spawn(self, actor: Actor[Any]) -> Actor[Any]:
        """Attach ``actor`` to this system; it runs whenever it has messages."""
        dispatcher = self._dispatcher
        if dispatcher is None:
            raise RuntimeError("the actor system is not running (use `async with`)")
        actor._dispatcher = dispatcher
        return actor

    def start_soon(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        """Run a long-lived helper task in the system's task group."""
        self.task_group.start_soon(fn, *args, name=name)
