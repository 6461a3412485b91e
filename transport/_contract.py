"""The transport contract: what every transport (memory, NATS) promises its users.

Three services travel over one connection:

* core messaging: fire-and-forget ``publish``/``subscribe`` with subject wildcards and queue
  groups, plus ``request``/reply;
* durable work queues (JetStream work-queue streams): at-least-once delivery to pull consumers
  with explicit acknowledgement, redelivery, a delivery limit and deduplication;
* key-value buckets with revisions, compare-and-set and time-to-live.

Handlers are synchronous and must not block: a transport calls them from its own machinery,
typically to hand the message to an actor's mailbox. A handler that raises is logged and the
transport carries on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeAlias

from ._subjects import check_name, compile_pattern

__all__ = [
    "Consumer",
    "Entry",
    "Handler",
    "KeyExistsError",
    "KeyValue",
    "Msg",
    "NoRespondersError",
    "QueueConfig",
    "RequestTimeoutError",
    "RevisionMismatchError",
    "Subscription",
    "Transport",
    "TransportError",
    "WorkHandler",
    "WorkMsg",
]


def check_log(memory: bool, max_bytes: int | None) -> None:
    """Check a log's storage settings (``ValueError`` when wrong)."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive number of bytes, not {max_bytes!r}")
    if memory and max_bytes is None:
        raise ValueError("a log kept in memory needs max_bytes (memory is not unbounded)")


def check_replicas(replicas: int) -> None:
    """``replicas`` must be a whole number from 1 to 5 (JetStream's limit)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
        raise ValueError(f"replicas must be a whole number from 1 to 5, not {replicas!r}")


class TransportError(Exception):
    """The root of the transport's errors: the operation could not be carried out."""


class KeyExistsError(TransportError):
    """``KeyValue.create`` found the key already present; read it, or ``update`` it instead."""


class RevisionMismatchError(TransportError):
    """A compare-and-set write named a revision that is not the key's current one.

    Someone else wrote the key since it was read: read it again and decide anew.
    """


class RequestTimeoutError(TransportError, TimeoutError):
    """No reply to a request arrived within its timeout."""


class NoRespondersError(TransportError):
    """A request was sent to a subject that nobody subscribes to."""


@dataclass(frozen=True, slots=True)
class Msg:
    """A core message, as handed to a subscriber or returned by ``request``.

    The headers mapping must be treated as read-only: all subscribers share one message.
    """

    subject: str
    """The subject it was published to."""
    data: bytes
    """The payload."""
    headers: Mapping[str, str] | None = None
    """Header fields, if the publisher set any."""
    reply: str | None = None
    """Where to publish an answer (``Transport.publish(msg.reply, ...)``), if a reply is wanted."""


class WorkMsg(ABC):
    """One delivery of a message from a durable work queue.

    Settle every delivery exactly once, with ``ack`` (done), ``nak`` (redeliver) or ``term``
    (give up); ``in_progress`` may be called any number of times before that. A delivery left
    unsettled for the queue's ``ack_wait`` is redelivered. Acknowledging an older delivery of a
    message that has since been redelivered still removes the message; ``nak`` and
    ``in_progress`` only act on the latest delivery.
    """

    __slots__ = ()

    subject: str
    """The subject it was enqueued on."""
    data: bytes
    """The payload."""
    headers: Mapping[str, str] | None
    """The headers given to ``enqueue``; a transport may add its own (e.g. ``Nats-Msg-Id``)."""
    num_delivered: int
    """How many times this message has been delivered, this time included (1 the first time)."""

    @abstractmethod
    async def ack(self) -> None:
        """Acknowledge: the work is done, remove the message from the queue."""

    @abstractmethod
    async def nak(self, delay: float | None = None) -> None:
        """Reject: redeliver the message, at once or after ``delay`` seconds.

        The message is dropped instead if it has reached the queue's ``max_deliver``.
        """

    @abstractmethod
    async def in_progress(self) -> None:
        """Still working on it: restart the ``ack_wait`` countdown of this delivery."""

    @abstractmethod
    async def term(self) -> None:
        """Terminate: never redeliver this message (it is removed like an acknowledged one)."""


class Subscription(ABC):
    """An active ``Transport.subscribe``."""

    __slots__ = ()

    @abstractmethod
    async def unsubscribe(self) -> None:
        """Stop receiving messages; calling it again does nothing."""


class Consumer(ABC):
    """An active ``Transport.consume``."""

    __slots__ = ()

    @abstractmethod
    async def stop(self) -> None:
        """Stop delivering to this consumer; calling it again does nothing.

        Deliveries already handed out stay valid and can still be settled. Those left unsettled
        are redelivered, after the queue's ``ack_wait``, to the durable's other consumers.
        """


@dataclass(frozen=True, slots=True)
class Entry:
    """A key-value entry: the current value of a key and the revision that wrote it."""

    key: str
    """The key."""
    value: bytes
    """The value."""
    revision: int
    """The revision of the write; compare-and-set against it with ``KeyValue.update``."""


class KeyValue(ABC):
    """A key-value bucket.

    Keys are letters, digits and ``-/_=.`` (not starting or ending with a dot); an invalid key
    raises ``ValueError``. Every write gets a revision greater than all earlier ones in the
    bucket.

    Time-to-live: a key created with ``ttl`` expires ``ttl`` seconds after its last write.
    ``put`` and ``update`` keep the key's ttl and restart its countdown, so a lease created with a
    ttl and renewed by ``update`` lives as long as it is renewed. A key without its own ttl
    follows the bucket's ``ttl`` (also counted from its last write), if the bucket has one. An
    expired key reads as absent and may be created again. Expiry may be as coarse as one second
    (NATS rounds ttls down to whole seconds), so prefer ttls of whole seconds.
    """

    __slots__ = ()

    @abstractmethod
    async def get(self, key: str) -> Entry | None:
        """The key's current entry, or ``None`` if it is absent, deleted or expired."""

    @abstractmethod
    async def put(self, key: str, value: bytes) -> int:
        """Write unconditionally and return the new revision."""

    @abstractmethod
    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write a key that is absent and return its revision.

        Raises ``KeyExistsError`` if the key is present; a deleted or expired key may be created
        again. ``ttl`` (seconds) makes the key expire that long after its last write.
        """

    @abstractmethod
    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Compare-and-set: write only if the key's current revision is ``last_revision``.

        Returns the new revision. Raises ``RevisionMismatchError`` if the key was written since,
        or is absent (use ``create`` for absent keys).
        """

    @abstractmethod
    async def delete(self, key: str, *, last_revision: int | None = None) -> None:
        """Delete a key; deleting an absent key does nothing.

        With ``last_revision``, delete only if that is the current revision, else raise
        ``RevisionMismatchError`` (an absent key mismatches too).
        """

    @abstractmethod
    async def keys(self) -> list[str]:
        """The keys present (not deleted or expired), in no particular order."""


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """A durable work queue (a JetStream stream with work-queue retention).

    A message enqueued on one of its subjects stays until a consumer acknowledges or terminates
    it, or it runs out of deliveries. Each message goes to the one durable whose filter matches
    it (durables of one queue must not overlap) and, within that durable, to one consumer.
    """

    name: str
    """The queue's (stream's) name, e.g. ``"ORCH_WORK"``: no whitespace, ``.``, ``*``, ``>``, ``/``
    or ``\\``."""
    subjects: tuple[str, ...]
    """The subject patterns it captures, with ``*`` and ``>``, e.g. ``("orch.step.>",)``.

    Queues must not overlap: no subject may match patterns of two queues.
    """
    max_deliver: int = 5
    """Deliveries allowed per message; a message not acknowledged after that many is dropped
    (and counted). ``-1`` means no limit."""
    ack_wait: float = 30.0
    """Seconds a delivery may stay unsettled before the message is redelivered."""
    duplicate_window: float = 120.0
    """Seconds during which a message with an already seen ``msg_id`` is dropped (0: off)."""
    replicas: int = 1
    """Copies of the queue a clustered server keeps (JetStream ``num_replicas``), set when the
    queue is created; an existing queue keeps its own. An in-process transport ignores it."""

    def __post_init__(self) -> None:
        check_name("queue", self.name)
        if isinstance(self.subjects, str):
            raise TypeError("subjects must be a tuple of patterns, not a string")
        object.__setattr__(self, "subjects", tuple(self.subjects))
        if not self.subjects:
            raise ValueError(f"queue {self.name!r} needs at least one subject")
        for subject in self.subjects:
            compile_pattern(subject)
        if self.max_deliver < 1 and self.max_deliver != -1:
            raise ValueError(f"max_deliver must be at least 1 (or -1), not {self.max_deliver}")
        if not self.ack_wait > 0:
            raise ValueError(f"ack_wait must be positive, not {self.ack_wait}")
        if not self.duplicate_window >= 0:
            raise ValueError(f"duplicate_window must be >= 0, not {self.duplicate_window}")
        check_replicas(self.replicas)


Handler: TypeAlias = Callable[[Msg], None]
"""A subscriber: synchronous and non-blocking (it typically hands the message to a mailbox)."""

WorkHandler: TypeAlias = Callable[[WorkMsg], None]
"""A work-queue consumer: synchronous and non-blocking, like ``Handler``."""


class Transport(ABC):
    """A connection to the messaging system; use it as ``async with transport:``.

    Entering connects (and starts background machinery), leaving closes. The other methods are
    valid only in between; outside, they raise ``TransportError``. Subjects and patterns that are
    malformed raise ``ValueError``.
    """

    __slots__ = ()

    @abstractmethod
    async def __aenter__(self) -> Self:
        """Connect."""

    @abstractmethod
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close: stop all subscriptions and consumers and release the connection."""

    waits_for_io: bool = True
    """Whether sending waits on the network: then sending several messages side by side (in
    tasks) saves round trips; an in-process transport says False (tasks would only cost)."""

    def has_interest(self, subject: str) -> bool:
        """Whether a message published on ``subject`` may reach someone.

        A hint that lets publishers skip encoding what nobody listens to; an implementation that
        cannot tell (a network transport, where a stream may capture the subject) says True.
        """
        return True

    @abstractmethod
    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply: str | None = None,
    ) -> None:
        """Publish a core message: at most once, to the subscribers present right now."""

    @abstractmethod
    async def subscribe(
        self, subject: str, handler: Handler, *, queue: str | None = None
    ) -> Subscription:
        """Call ``handler`` for every message on subjects matching the pattern ``subject``.

        ``*`` matches one token, ``>`` the rest (one token or more). Every plain subscriber gets
        each message; the members of a queue group (same ``queue`` name) share them, each
        message going to one member.
        """

    @abstractmethod
    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Msg:
        """Publish with a reply subject and return the first reply.

        Responders answer with ``publish(msg.reply, ...)``. Raises ``NoRespondersError`` when
        nobody subscribes to ``subject``, ``RequestTimeoutError`` when no reply comes within
        ``timeout`` seconds.
        """

    @abstractmethod
    async def ensure_queue(self, config: QueueConfig) -> None:
        """Create the work queue, or update it to ``config`` if it exists (idempotent).

        Raises ``TransportError`` if its subjects overlap another queue's.
        """

    async def ensure_log(
        self,
        name: str,
        subjects: tuple[str, ...],
        *,
        max_age: float,
        replicas: int = 1,
        memory: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        """Keep what is published on ``subjects`` for ``max_age`` seconds (idempotent).

        Publishing and subscribing work the same with or without it; a network transport stores
        the messages (for subscribers that come later, or replay), an in-process one need not
        (this default keeps nothing). ``replicas``: copies a clustered server keeps, set when
        the log is created. ``max_bytes``: the oldest messages go first beyond this size.
        ``memory``: keep the log in the server's memory, not on disk (faster, lost when the
        server stops), which needs a ``max_bytes``; an existing log keeps its storage.
        """
        check_replicas(replicas)
        check_log(memory, max_bytes)

    @abstractmethod
    async def enqueue(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> bool:
        """Store a message in the work queue whose subjects match ``subject``.

        A message whose ``msg_id`` was already enqueued within the queue's duplicate window is
        dropped. Returns whether the message was stored (``False``: dropped as a duplicate).
        Raises ``TransportError`` if no queue captures ``subject``.
        """

    @abstractmethod
    async def consume(
        self,
        queue: str,
        durable: str,
        filter_subject: str,
        handler: WorkHandler,
        *,
        max_in_flight: int = 64,
    ) -> Consumer:
        """Start delivering the queue's messages matching ``filter_subject`` to ``handler``.

        ``durable`` names a cursor that outlives consumers: all ``consume`` calls with the same
        ``(queue, durable)`` share it (and must use the same filter), each message going to one
        of them; messages enqueued while it has no consumer wait for one. At most
        ``max_in_flight`` unsettled deliveries are outstanding per call; settling one (or its
        ``ack_wait`` running out) frees a slot. Redeliveries come before new messages.

        Raises ``TransportError`` if the queue does not exist, the filter captures none of its
        subjects, it overlaps another durable's filter, or the durable has another filter.
        """

    @abstractmethod
    async def open_kv(
        self, bucket: str, *, ttl: float | None = None, history: int = 1, replicas: int = 1
    ) -> KeyValue:
        """Create the key-value bucket, or open it if it exists (its settings then updated).

        ``ttl`` is the bucket's default time-to-live in seconds (see ``KeyValue``); ``history``
        is how many revisions per key the bucket keeps (1 to 64); ``replicas`` how many copies a
        clustered server keeps, set when the bucket is created (an existing one keeps its own;
        an in-process transport ignores it).
        """
