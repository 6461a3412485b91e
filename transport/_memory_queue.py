"""Work queues in memory: streams with work-queue retention, durables and their consumers.

Everything is synchronous and inline: enqueueing hands the message straight to a consumer with a
free slot, settling a delivery pulls the next waiting message into the freed slot. Only
deadlines (``ack_wait``, delayed naks) go through the ``Scheduler``.

Deadlines of the deliveries of a stream are tracked in one insertion-ordered dict: every
deadline is "now + ack_wait", so insertion order is deadline order, the head is the earliest,
and one scheduled callback per stream (re-armed for the new head) serves them all.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Mapping

from ._contract import Consumer, QueueConfig, WorkHandler, WorkMsg
from ._scheduler import Scheduler
from ._subjects import Pattern, compile_pattern, matches

logger = logging.getLogger("transport")

_ROUTE_CACHE_SIZE = 10_000


class _Stored:
    """A message held by a queue, across its deliveries."""

    __slots__ = ("current", "data", "deliveries", "done", "headers", "subject")

    def __init__(self, subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.deliveries = 0
        self.current: Delivery | None = None  # the unsettled delivery, if one is out
        self.done = False  # acknowledged, terminated or dropped


class Delivery(WorkMsg):
    """One delivery of a stored message to one consumer."""

    __slots__ = ("_consumer", "_deadline", "_stored", "data", "headers", "num_delivered", "subject")

    def __init__(self, stored: _Stored, consumer: MemoryConsumer, deadline: float) -> None:
        self.subject = stored.subject
        self.data = stored.data
        self.headers = stored.headers
        self.num_delivered = stored.deliveries
        self._stored = stored
        self._consumer = consumer
        self._deadline = deadline

    async def ack(self) -> None:
        stream = self._consumer.stream
        stream.finish(self._stored)
        await stream.scheduler.tick()

    async def term(self) -> None:
        stream = self._consumer.stream
        stream.finish(self._stored)
        await stream.scheduler.tick()

    async def nak(self, delay: float | None = None) -> None:
        stream = self._consumer.stream
        stream.nak(self, delay)
        await stream.scheduler.tick()

    async def in_progress(self) -> None:
        stream = self._consumer.stream
        stream.touch(self)
        await stream.scheduler.tick()

    def __repr__(self) -> str:
        return f"<Delivery {self.subject!r} #{self.num_delivered}>"


class MemoryConsumer(Consumer):
    """One ``consume`` call: a handler with its own in-flight budget, attached to a durable."""

    __slots__ = ("active", "durable", "handler", "in_flight", "max_in_flight", "stream")

    def __init__(self, durable: Durable, handler: WorkHandler, max_in_flight: int) -> None:
        self.durable = durable
        self.stream = durable.stream
        self.handler = handler
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.active = True

    async def stop(self) -> None:
        if self.active:
            self.active = False
            self.durable.detach(self)


class Durable:
    """A named cursor on a stream: the messages of its filter, shared by its consumers."""

    __slots__ = ("_next", "backlog", "consumers", "filter", "name", "pattern", "retry", "stream")

    def __init__(self, stream: Stream, name: str, filter_subject: str, pattern: Pattern) -> None:
        self.stream = stream
        self.name = name
        self.filter = filter_subject
        self.pattern = pattern
        self.consumers: list[MemoryConsumer] = []
        self.backlog: deque[_Stored] = deque()  # never delivered yet, in enqueue order
        self.retry: deque[_Stored] = deque()  # due for redelivery: served first
        self._next = 0  # round-robin position in consumers

    def attach(self, consumer: MemoryConsumer) -> None:
        self.consumers.append(consumer)
        self.pump()

    def detach(self, consumer: MemoryConsumer) -> None:
        self.consumers.remove(consumer)
        if self._next >= len(self.consumers):
            self._next = 0

    def offer(self, stored: _Stored) -> None:
        """A new message: deliver it now if a consumer has room and nothing waits before it."""
        if not self.backlog and not self.retry:
            consumer = self._free_consumer()
            if consumer is not None:
                self.stream.deliver(consumer, stored)
                return
        self.backlog.append(stored)

    def requeue(self, stored: _Stored) -> None:
        """A delayed nak ran out: redeliver, unless the message was settled meanwhile."""
        if not stored.done:
            self.retry.append(stored)
            self.pump()

    def pump(self) -> None:
        """Deliver waiting messages while some consumer has room."""
        retry, backlog = self.retry, self.backlog
        while retry or backlog:
            consumer = self._free_consumer()
            if consumer is None:
                return
            if retry:
                stored = retry.popleft()
                if stored.done:  # acknowledged late, by an earlier delivery
                    continue
            else:
                stored = backlog.popleft()
            self.stream.deliver(consumer, stored)

    def _free_consumer(self) -> MemoryConsumer | None:
        consumers = self.consumers
        count = len(consumers)
        if count == 1:
            only = consumers[0]
            return only if only.in_flight < only.max_in_flight else None
        i = self._next
        for _ in range(count):
            consumer = consumers[i]
            i = i + 1 if i + 1 < count else 0
            if consumer.in_flight < consumer.max_in_flight:
                self._next = i
                return consumer
        return None


class Stream:
    """A work queue: its configuration, durables, unclaimed messages and delivery deadlines."""

    __slots__ = (
        "_armed",
        "_inflight",
        "_routes",
        "_seen",
        "_seen_order",
        "_unclaimed",
        "config",
        "dropped",
        "durables",
        "patterns",
        "scheduler",
    )

    def __init__(self, config: QueueConfig, scheduler: Scheduler) -> None:
        self.config = config
        self.patterns = tuple(compile_pattern(s) for s in config.subjects)
        self.scheduler = scheduler
        self.durables: dict[str, Durable] = {}
        self.dropped = 0  # messages dropped after max_deliver deliveries
        self._routes: dict[str, Durable | None] = {}  # subject -> the durable it goes to
        self._unclaimed: deque[_Stored] = deque()  # messages no durable's filter matches yet
        self._inflight: dict[Delivery, None] = {}  # unsettled deliveries, in deadline order
        self._armed = False  # a call to _expire is scheduled
        self._seen: set[str] = set()  # msg ids inside the duplicate window
        self._seen_order: deque[tuple[float, str]] = deque()  # (forget at, msg id)

    def reconfigure(self, config: QueueConfig) -> None:
        # A changed ack_wait applies to later deliveries; the deadline order of the ones already
        # out may then be off, which only delays their redelivery until the head's deadline.
        self.config = config
        self.patterns = tuple(compile_pattern(s) for s in config.subjects)

    def add_durable(self, name: str, filter_subject: str, pattern: Pattern) -> Durable:
        """Create a durable; it claims the waiting messages its filter matches."""
        durable = Durable(self, name, filter_subject, pattern)
        self.durables[name] = durable
        self._routes.clear()
        keep: deque[_Stored] = deque()
        for stored in self._unclaimed:
            if matches(pattern, stored.subject.split(".")):
                durable.backlog.append(stored)
            else:
                keep.append(stored)
        self._unclaimed = keep
        return durable

    def append(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        msg_id: str | None,
    ) -> bool:
        """Store a new message and hand it on (hot path); ``False``: a duplicate, dropped."""
        if msg_id is not None and self._is_duplicate(msg_id):
            return False
        stored = _Stored(subject, data, headers)
        try:
            durable = self._routes[subject]
        except KeyError:
            durable = self._route(subject)
        if durable is None:
            self._unclaimed.append(stored)
        else:
            durable.offer(stored)
        return True

    def deliver(self, consumer: MemoryConsumer, stored: _Stored) -> None:
        """Hand a message to a consumer with room (hot path)."""
        stored.deliveries += 1
        deadline = time.monotonic() + self.config.ack_wait
        delivery = Delivery(stored, consumer, deadline)
        stored.current = delivery
        consumer.in_flight += 1
        self._inflight[delivery] = None
        if not self._armed:
            self._armed = True
            self.scheduler.call_at(deadline, self._expire)
        try:
            consumer.handler(delivery)
        except Exception:
            logger.exception("work handler failed on %r (it will be redelivered)", delivery)

    def finish(self, stored: _Stored) -> None:
        """Acknowledge or terminate: the message is done, whichever delivery says so."""
        if stored.done:
            return
        stored.done = True
        delivery = stored.current
        if delivery is not None:
            stored.current = None
            consumer = delivery._consumer
            consumer.in_flight -= 1
            del self._inflight[delivery]
            if consumer.active:
                consumer.durable.pump()

    def nak(self, delivery: Delivery, delay: float | None) -> None:
        """Redeliver the message of the latest delivery, now or after ``delay`` seconds."""
        stored = delivery._stored
        if stored.current is not delivery:
            return
        stored.current = None
        consumer = delivery._consumer
        consumer.in_flight -= 1
        del self._inflight[delivery]
        durable = consumer.durable
        if self._exhausted(stored):
            pass
        elif delay is not None and delay > 0:
            callback = functools.partial(durable.requeue, stored)
            self.scheduler.call_at(time.monotonic() + delay, callback)
        else:
            durable.retry.append(stored)
        durable.pump()

    def touch(self, delivery: Delivery) -> None:
        """Restart the ack_wait countdown of the latest delivery."""
        if delivery._stored.current is not delivery:
            return
        del self._inflight[delivery]  # and re-insert last: its deadline is now the latest
        delivery._deadline = time.monotonic() + self.config.ack_wait
        self._inflight[delivery] = None

    def _exhausted(self, stored: _Stored) -> bool:
        limit = self.config.max_deliver
        if limit == -1 or stored.deliveries < limit:
            return False
        stored.done = True
        self.dropped += 1
        logger.warning(
            "queue %s dropped a message on %r after %d deliveries",
            self.config.name,
            stored.subject,
            stored.deliveries,
        )
        return True

    def _expire(self) -> None:
        """Redeliver the messages whose ack_wait ran out; re-arm for the next deadline."""
        self._armed = False
        inflight = self._inflight
        now = time.monotonic()
        expired: list[Delivery] = []
        for delivery in inflight:
            if delivery._deadline > now:
                break
            expired.append(delivery)
        durables: dict[Durable, None] = {}
        for delivery in expired:
            del inflight[delivery]
            stored = delivery._stored
            stored.current = None
            consumer = delivery._consumer
            consumer.in_flight -= 1  # the slot is free again, even if its handler still runs
            if not self._exhausted(stored):
                consumer.durable.retry.append(stored)
            durables[consumer.durable] = None
        if inflight:
            # Arm for the current head before redelivering: redeliveries get later deadlines.
            self._armed = True
            self.scheduler.call_at(next(iter(inflight))._deadline, self._expire)
        for durable in durables:
            durable.pump()

    def _is_duplicate(self, msg_id: str) -> bool:
        window = self.config.duplicate_window
        if not window:
            return False
        now = time.monotonic()
        seen, order = self._seen, self._seen_order
        while order and order[0][0] <= now:
            seen.discard(order.popleft()[1])
        if msg_id in seen:
            return True
        seen.add(msg_id)
        order.append((now + window, msg_id))
        return False

    def _route(self, subject: str) -> Durable | None:
        tokens = subject.split(".")
        found = None
        for durable in self.durables.values():
            if matches(durable.pattern, tokens):
                found = durable
                break
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[subject] = found
        return found
