"""The memory transport: the whole contract in one process, for local mode and fast tests."""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup

from ._contract import (
    Consumer,
    Handler,
    KeyValue,
    Msg,
    NoRespondersError,
    QueueConfig,
    RequestTimeoutError,
    Subscription,
    Transport,
    TransportError,
    WorkHandler,
    check_replicas,
)
from ._memory_kv import MemoryKeyValue, check_settings
from ._memory_queue import MemoryConsumer, Stream
from ._scheduler import Scheduler
from ._subjects import (
    Pattern,
    check_bucket,
    check_name,
    collide,
    compile_pattern,
    matches,
    split_subject,
)

logger = logging.getLogger("transport")

_ROUTE_CACHE_SIZE = 10_000


class _Subscription(Subscription):
    __slots__ = ("_transport", "handler", "pattern", "queue", "subject")

    def __init__(
        self,
        transport: MemoryTransport,
        subject: str,
        pattern: Pattern,
        handler: Handler,
        queue: str | None,
    ) -> None:
        self._transport = transport
        self.subject = subject
        self.pattern = pattern
        self.handler = handler
        self.queue = queue

    async def unsubscribe(self) -> None:
        self._transport._remove(self)

    def __repr__(self) -> str:
        return f"<Subscription {self.subject!r} queue={self.queue!r}>"


class _Group:
    """The members of one queue group that match one subject, served round-robin."""

    __slots__ = ("handlers", "next")

    def __init__(self, handlers: list[Handler]) -> None:
        self.handlers = handlers
        self.next = 0


class _Route:
    """Who gets a message published on one subject: computed once, cached per subject."""

    __slots__ = ("empty", "groups", "handlers")

    def __init__(self, handlers: tuple[Handler, ...], groups: tuple[_Group, ...]) -> None:
        self.handlers = handlers
        self.groups = groups
        self.empty = not handlers and not groups


def _could_match(pattern: tuple[str, ...], first: list[str]) -> bool:
    """Whether a subject starting with the tokens ``first`` may match ``pattern``."""
    for want, token in zip(pattern, first, strict=False):
        if want == ">":
            return True
        if want != "*" and want != token:
            return False
    return True


class MemoryTransport(Transport):
    """The transport contract within one process: no network, no persistence.

    Delivery is synchronous: ``publish`` calls the matching handlers before it returns (plain
    subscribers in subscription order, then one member per queue group, round-robin);
    ``enqueue`` hands the message to a consumer with a free slot (round-robin among the
    durable's consumers) or keeps it, and settling a delivery pulls the next waiting message into
    the freed slot. Deadlines (``ack_wait``, nak delays, ttls) are served by one background task.
    Every 64 operations yield to the event loop, so a tight publishing loop cannot starve other
    tasks.

    A ``MemoryTransport`` is entered once; its queues and buckets live as long as it does. Like
    the event loop it runs on, it is not thread-safe.
    """

    def __init__(self) -> None:
        self._scheduler = Scheduler()
        self._task_group: TaskGroup | None = None
        self._open = False
        self._used = False
        self._subscriptions: list[_Subscription] = []
        self._routes: dict[str, _Route] = {}
        self._heads: dict[str, tuple[_Subscription, ...]] = {}
        self._interest: dict[str, bool] = {}
        self._replies: dict[str, Callable[[Msg], None]] = {}
        self._inbox = f"_INBOX.{secrets.token_hex(8)}."
        self._inbox_ids = itertools.count(1)
        self._streams: dict[str, Stream] = {}
        self._queue_routes: dict[str, Stream] = {}
        self._buckets: dict[str, MemoryKeyValue] = {}

    def __repr__(self) -> str:
        state = "open" if self._open else "closed" if self._used else "new"
        return f"<MemoryTransport {state}>"

    async def __aenter__(self) -> Self:
        if self._used:
            raise TransportError("a MemoryTransport can be entered only once; make a new one")
        self._used = True
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        task_group.start_soon(self._scheduler.run, name="transport timers")
        self._task_group = task_group
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)

    # --- core messaging ---------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply: str | None = None,
    ) -> None:
        if not self._open:
            raise self._closed()
        if self._replies:
            waiter = self._replies.pop(subject, None)
            if waiter is not None:
                # A reply inbox is private to its requester: no need to route it further.
                waiter(Msg(subject, data, headers))
                await self._scheduler.tick()
                return
        route = self._routes.get(subject) or self._route(subject)
        if not route.empty:
            msg = Msg(subject, data, headers, reply)
            for handler in route.handlers:
                try:
                    handler(msg)
                except Exception:
                    logger.exception("subscriber %r failed on %r", handler, subject)
            for group in route.groups:
                handlers = group.handlers
                i = group.next
                group.next = i + 1 if i + 1 < len(handlers) else 0
                try:
                    handlers[i](msg)
                except Exception:
                    logger.exception("subscriber %r failed on %r", handlers[i], subject)
        await self._scheduler.tick()

    waits_for_io = False

    def has_interest(self, subject: str) -> bool:
        route = self._routes.get(subject)
        if route is not None:
            return not route.empty
        # A transaction's coordinator asks about its event subject once per turn: the answers
        # are kept (a bounded number, all forgotten whenever the subscriptions change).
        known = self._interest.get(subject)
        if known is not None:
            return known
        if len(self._interest) > 4096:
            self._interest.clear()
        known = self._interest[subject] = self._has_interest(subject)
        return known

    def _has_interest(self, subject: str) -> bool:
        # Subjects are mostly one-off (one per transaction): the subscriptions that could match
        # a subject's first two tokens are kept too, for the next transaction's subject.
        head = subject.split(".", 2)
        key = ".".join(head[:2])
        candidates = self._heads.get(key)
        if candidates is None:
            first = head[:2]
            candidates = self._heads[key] = tuple(
                sub for sub in self._subscriptions if _could_match(sub.pattern, first)
            )
        if not candidates:
            return False
        tokens = split_subject(subject)
        return any(matches(sub.pattern, tokens) for sub in candidates)

    async def subscribe(
        self, subject: str, handler: Handler, *, queue: str | None = None
    ) -> Subscription:
        self._check_open()
        if queue is not None and not queue:
            raise ValueError("queue group name must not be empty")
        subscription = _Subscription(self, subject, compile_pattern(subject), handler, queue)
        self._subscriptions.append(subscription)
        self._routes.clear()
        self._heads.clear()
        self._interest.clear()
        return subscription

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Msg:
        self._check_open()
        route = self._routes.get(subject) or self._route(subject)
        if route.empty:
            raise NoRespondersError(f"no responders on {subject!r}: nobody subscribes to it")
        inbox = f"{self._inbox}{next(self._inbox_ids)}"
        replies: list[Msg] = []
        arrived = anyio.Event()

        def on_reply(msg: Msg) -> None:
            replies.append(msg)
            arrived.set()

        self._replies[inbox] = on_reply
        try:
            await self.publish(subject, data, headers=headers, reply=inbox)
            with anyio.move_on_after(timeout):
                await arrived.wait()
        finally:
            self._replies.pop(inbox, None)
        if not replies:
            raise RequestTimeoutError(f"no reply on {subject!r} within {timeout} s")
        return replies[0]

    def _route(self, subject: str) -> _Route:
        tokens = split_subject(subject)
        handlers: list[Handler] = []
        groups: dict[str, list[Handler]] = {}
        for sub in self._subscriptions:
            if matches(sub.pattern, tokens):
                if sub.queue is None:
                    handlers.append(sub.handler)
                else:
                    groups.setdefault(sub.queue, []).append(sub.handler)
        route = _Route(tuple(handlers), tuple(_Group(g) for g in groups.values()))
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[subject] = route
        return route

    def _remove(self, subscription: _Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
            self._routes.clear()
            self._heads.clear()
        self._interest.clear()

    # --- work queues ------------------------------------------------------------------------

    async def ensure_queue(self, config: QueueConfig) -> None:
        self._check_open()
        patterns = [compile_pattern(s) for s in config.subjects]
        for other in self._streams.values():
            if other.config.name != config.name and any(
                collide(mine, theirs) for mine in patterns for theirs in other.patterns
            ):
                raise TransportError(
                    f"subjects of queue {config.name!r} overlap those of queue "
                    f"{other.config.name!r}: a subject may belong to one queue only"
                )
        stream = self._streams.get(config.name)
        if stream is None:
            self._streams[config.name] = Stream(config, self._scheduler)
        else:
            stream.reconfigure(config)
        self._queue_routes.clear()

    async def enqueue(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> bool:
        if not self._open:
            raise self._closed()
        stream = self._queue_routes.get(subject) or self._queue_for(subject)
        stored = stream.append(subject, data, headers, msg_id)
        await self._scheduler.tick()
        return stored

    async def consume(
        self,
        queue: str,
        durable: str,
        filter_subject: str,
        handler: WorkHandler,
        *,
        max_in_flight: int = 64,
    ) -> Consumer:
        self._check_open()
        check_name("durable", durable)
        pattern = compile_pattern(filter_subject)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        stream = self._streams.get(queue)
        if stream is None:
            raise TransportError(f"no queue {queue!r}: call ensure_queue first")
        if not any(collide(pattern, p) for p in stream.patterns):
            raise TransportError(
                f"filter {filter_subject!r} captures none of queue {queue!r}'s subjects "
                f"{stream.config.subjects}"
            )
        cursor = stream.durables.get(durable)
        if cursor is None:
            for other in stream.durables.values():
                if collide(pattern, other.pattern):
                    raise TransportError(
                        f"filter {filter_subject!r} of durable {durable!r} overlaps filter "
                        f"{other.filter!r} of durable {other.name!r} on work queue {queue!r}"
                    )
            cursor = stream.add_durable(durable, filter_subject, pattern)
        elif cursor.filter != filter_subject:
            raise TransportError(
                f"durable {durable!r} of queue {queue!r} filters {cursor.filter!r}, "
                f"not {filter_subject!r}"
            )
        consumer = MemoryConsumer(cursor, handler, max_in_flight)
        cursor.attach(consumer)
        return consumer

    def dropped_count(self, queue: str) -> int:
        """How many messages of ``queue`` were dropped after ``max_deliver`` deliveries."""
        stream = self._streams.get(queue)
        if stream is None:
            raise TransportError(f"no queue {queue!r}")
        return stream.dropped

    def _queue_for(self, subject: str) -> Stream:
        tokens = split_subject(subject)
        for stream in self._streams.values():
            if any(matches(p, tokens) for p in stream.patterns):
                if len(self._queue_routes) >= _ROUTE_CACHE_SIZE:
                    self._queue_routes.clear()
                self._queue_routes[subject] = stream
                return stream
        raise TransportError(f"no queue captures subject {subject!r}: call ensure_queue first")

    # --- key-value --------------------------------------------------------------------------

    async def open_kv(
        self, bucket: str, *, ttl: float | None = None, history: int = 1, replicas: int = 1
    ) -> KeyValue:
        self._check_open()
        check_bucket(bucket)
        check_settings(ttl, history)
        check_replicas(replicas)  # one process keeps one copy
        store = self._buckets.get(bucket)
        if store is None:
            store = self._buckets[bucket] = MemoryKeyValue(bucket, ttl, history, self._scheduler)
        else:
            store.ttl, store.history = ttl, history
        return store

    # --- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise self._closed()

    def _closed(self) -> TransportError:
        if self._used:
            return TransportError("the transport is closed")
        return TransportError("the transport is not open: use it inside `async with transport:`")
