"""The actor runtime: mailboxes, actors that handle one message at a time, supervision."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup

__all__ = ["Actor", "ActorSystem", "Directive", "Mailbox"]

M = TypeVar("M")
log = structlog.get_logger("actors")


class Mailbox(Generic[M]):
    """An unbounded FIFO of messages with one reader.

    A deque plus an anyio :class:`~anyio.Event` armed only while the reader waits. anyio's memory
    object streams make every ``receive`` a scheduling checkpoint, which doubled the event-loop
    wake-ups per message on the hot path; this keeps one wake-up per idle-to-busy transition and
    none while messages are queued (see docs/architecture.md).
    """

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[M] = deque()
        self._waiter: anyio.Event | None = None
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

    async def get(self) -> M:
        """The next item, waiting for one; ``EndOfStream`` once closed and drained."""
        while not self._items:
            if self._closed:
                raise anyio.EndOfStream
            waiter = self._waiter = anyio.Event()
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
    """Stop the actor; its remaining messages are handed to ``on_stopped``."""
    ESCALATE = "escalate"
    """Re-raise: the actor system's task group fails."""


class Actor(Generic[M]):
    """An actor owns its state and a mailbox and handles one message at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mailbox: Mailbox[M] = Mailbox()
        self._stopping = False

    async def on_message(self, message: M) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def on_failure(self, message: M, exc: Exception) -> Directive:
        """Supervision policy for this actor (default: log and restart)."""
        log.error("actor failed", actor=self.name, exc_info=exc)
        return Directive.RESTART

    async def on_restart(self) -> None:
        """Reset in-memory state after a failure (default: nothing)."""

    async def on_stopped(self) -> None:
        """Called once the actor stopped."""

    def idle(self) -> bool:
        """Called when the mailbox is empty: return True to stop (passivate) the actor now."""
        return False

    def stop(self) -> None:
        """Stop after the messages already queued."""
        self._stopping = True
        self.mailbox.close()

    async def run(self) -> None:
        """The actor's loop (the system runs it as a task)."""
        mailbox = self.mailbox
        try:
            while True:
                message = mailbox.get_nowait()
                if message is None:
                    if self._stopping or self.idle():
                        return
                    try:
                        message = await mailbox.get()
                    except anyio.EndOfStream:
                        return
                try:
                    await self.on_message(message)
                except Exception as exc:
                    directive = await self.on_failure(message, exc)
                    if directive is Directive.ESCALATE:
                        raise
                    if directive is Directive.STOP:
                        return
                    if directive is Directive.RESTART:
                        await self.on_restart()
        finally:
            mailbox.close()
            await self.on_stopped()


class ActorSystem:
    """Runs actors as tasks of one task group (``async with ActorSystem() as system``)."""

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None
        self._exit: Any = None

    async def __aenter__(self) -> ActorSystem:
        self._cm = anyio.create_task_group()
        self._tg = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        result = await self._cm.__aexit__(*exc)
        self._tg = None
        return result

    @property
    def task_group(self) -> TaskGroup:
        """The group every actor and helper task of this system runs in."""
        if self._tg is None:
            raise RuntimeError("the actor system is not running (use `async with`)")
        return self._tg

    def spawn(self, actor: Actor[Any]) -> Actor[Any]:
        """Start ``actor``'s loop."""
        self.task_group.start_soon(actor.run, name=f"actor {actor.name}")
        return actor

    def start_soon(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        """Run a helper task in the system's task group."""
        self.task_group.start_soon(fn, *args, name=name)
