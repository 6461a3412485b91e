"""The NATS transport: the contract over a nats-server, with JetStream for queues and buckets.

Core messaging maps one to one onto NATS. Work queues are JetStream streams with work-queue
retention read through durable pull consumers; buckets are JetStream key-value streams. The
JetStream management calls, publishing and direct gets go through nats-py; two pieces are our
own, because nats-py's helpers do not fit the contract:

* the pull loop of ``consume``: nats-py's ``fetch`` waits for a whole batch, while the contract
  wants each message handed over as it arrives and a slot refilled as soon as it is settled;
* the key-value layer: nats-py's ``KeyValue`` neither keeps a key's ttl across ``put`` and
  ``update`` nor shows the headers of a stored entry, where that ttl lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.client import Client
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext, api

from ._contract import (
    Consumer,
    Entry,
    Handler,
    KeyExistsError,
    KeyValue,
    Msg,
    NoRespondersError,
    QueueConfig,
    RequestTimeoutError,
    RevisionMismatchError,
    Subscription,
    Transport,
    TransportError,
    WorkHandler,
    WorkMsg,
    check_log,
    check_replicas,
)
from ._memory_kv import check_settings
from ._subjects import (
    check_bucket,
    check_key_cached,
    check_name,
    check_subject,
    collide,
    compile_pattern,
)

__all__ = ["NatsTransport"]

logger = logging.getLogger("transport")

_API = api.DEFAULT_PREFIX
"""The JetStream API prefix (JetStream domains are not supported)."""

# JetStream error codes we act on.
_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_STREAM_OVERLAP = 10065  # "subjects overlap with an existing stream"
_WRONG_LAST_SEQUENCE = (10071, 10164)  # a compare-and-set publish lost
_NO_MESSAGE = 10037  # "no message found"

# Stream metadata recording a queue's delivery settings, which JetStream keeps on consumers: a
# consumer created later, by any process, reads them from the stream.
_MAX_DELIVER = "transport.max_deliver"
_ACK_WAIT = "transport.ack_wait"

_DEFAULTS = QueueConfig("defaults", ("defaults",))
"""Delivery settings for a queue whose stream does not record them (made by someone else)."""
_MIN_DUPLICATE_WINDOW = 0.1
"""The shortest duplicate window nats-server accepts (seconds); 0 would mean its default."""

_PULL_EXPIRES = 30.0
"""Seconds a pull request waits on the server for messages before it expires (and is renewed)."""
_PULL_HEARTBEAT = 5.0
"""Seconds between the server's heartbeats on an idle pull request: two missed ones and the
loop takes its pull requests for lost (say, by a restarted server) and pulls anew."""
_PULL_BACKOFF = (0.1, 5.0)
"""First and longest pause after a pull request failed (the consumer is missing, ...)."""

_MARKER_TTL = 60
"""Seconds a key's deletion marker is kept (then the key leaves no trace in the stream)."""
_KNOWN_KEYS = 10_000
"""Keys whose latest revision a bucket handle remembers (see ``_NatsKeyValue``)."""
_KEYS_TIMEOUT = 10.0
"""Seconds ``keys`` may take to receive the listing."""
_CAS_ATTEMPTS = 100
"""Compare-and-set rounds a ``put`` or ``create`` tries before giving up (only under heavy
contention on one key)."""

_KV_OPERATION = "KV-Operation"
_KV_DELETED = ("DEL", "PURGE")
_MARKER_REASON = "Nats-Marker-Reason"  # on markers the server itself places (2.11+)
_TTL = api.Header.MSG_TTL.value
_EXPECTED_LAST = api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value
_STATUS = api.Header.STATUS.value
_PENDING_MESSAGES = "Nats-Pending-Messages"

_STATUS_HEARTBEAT = "100"
_STATUS_TIMEOUT = "408"
_STATUS_CONFLICT = "409"


def _translate(what: str, error: nats.errors.Error) -> TransportError:
    """A ``TransportError`` saying what failed, for one of nats-py's errors."""
    if isinstance(error, nats.js.errors.APIError):
        return TransportError(f"{what}: {error.description} (JetStream error {error.err_code})")
    if isinstance(error, nats.errors.TimeoutError):
        return TransportError(f"{what}: no answer from the server in time")
    return TransportError(f"{what}: {error}")


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn nats-py's errors into ``TransportError`` (with the original as the cause)."""
    try:
        yield
    except nats.errors.Error as error:
        raise _translate(what, error) from error


async def _log_connection_error(error: Exception) -> None:
    # nats-py's default logs a traceback for every lost connection; reconnecting is routine.
    logger.warning("NATS connection: %s", error or type(error).__name__)


def _ttl_header(ttl: float) -> str:
    # NATS counts ttls in whole seconds, at least one: round up, so a key never expires early.
    return str(max(1, math.ceil(ttl)))


def _seconds(value: float | None) -> int:
    """Seconds as whole nanoseconds, to compare durations the way the server stores them."""
    return round((value or 0) * 1_000_000_000)


class _NatsSubscription(Subscription):
    __slots__ = ("_sub", "_subject")

    def __init__(self, sub: NatsSubscription, subject: str) -> None:
        self._sub: NatsSubscription | None = sub
        self._subject = subject

    async def unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            # A closed (or closing) connection has no subscriptions left to remove.
            with contextlib.suppress(
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionDrainingError,
                nats.errors.BadSubscriptionError,
            ):
                await sub.unsubscribe()

    def __repr__(self) -> str:
        return f"<NatsSubscription {self._subject!r}>"


_WHITESPACE = re.compile(r"\s")
_V1_ACK_TOKENS = 9
"""Tokens of a JetStream ack subject without domain and account (``$JS.ACK.<stream>...``)."""
_PING = b"PING\r\n"
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name nats-py sends as is (its own rule)."""


def pub_command(
    subject: str, reply: str, payload: bytes, headers: Mapping[str, str] | None
) -> bytes | None:
    """The protocol command nats-py's publish writes for these arguments (``PUB``, or ``HPUB``
    with headers), or ``None`` for headers it would reject or rewrite (a name it refuses, an
    empty one, a value with a line break or surrounding spaces)."""
    if headers is None:
        return b"PUB %b %b %d\r\n%b\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    lines = ["NATS/1.0\r\n"]
    for key, value in headers.items():
        if (
            _HEADER_KEY.fullmatch(key) is None
            or "\r" in value
            or "\n" in value
            or value != value.strip()
        ):
            return None
        lines.append(f"{key}: {value}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode()
    return b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
        subject.encode(),
        reply.encode(),
        len(head),
        len(head) + len(payload),
        head,
        payload,
    )


async def _unused(msg: NatsMsg) -> None:
    """The callback nats-py needs for an inline subscription: messages never reach it."""


class _Client(Client):
    """nats-py's client with a faster parser of message headers (same results), and
    subscriptions whose handlers run as their messages are read.

    nats-py tests every character of every header name with ``str.isspace`` in a generator:
    with a header on most messages (message ids on the work queue, ``Content-Type`` on events,
    key-value entries), that was a quarter of a waiting client's time. A regular expression
    does the same test in one call; ``tests/transport/test_nats_headers.py`` checks that both
    give the same headers.

    nats-py hands each message of a subscription with a callback to a task of its own, through
    a queue: a put, a task switch and an await of the callback per message. The handlers of our
    subscriptions are synchronous and quick (they settle a future, or hand the message to a
    mailbox), so :meth:`subscribe_inline` calls them in the reading task itself: one event-loop
    turn less on every hop of a workflow.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inline: dict[int, Callable[[NatsMsg], None]] = {}

    async def subscribe_inline(
        self, subject: str, handler: Callable[[NatsMsg], None], queue: str = ""
    ) -> NatsSubscription:
        """Subscribe with a synchronous ``handler``, called as each message is read (so it must
        not block); an exception it raises is logged."""
        sub = await self.subscribe(subject, queue=queue, cb=_unused)
        self._inline[sub._id] = handler
        return sub

    async def send(
        self,
        subject: str,
        payload: bytes,
        reply: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """``publish``, for a subject the caller has checked: the command is built in one go
        (:func:`pub_command`), without nats-py's second check of the subject and its header
        encoder (a third of a publish). nats-py's own path takes what this one does not
        handle (a connection that is not up, an oversized payload, a header it would reject or
        rewrite), and so has the last word on those."""
        command = None
        if self._status == Client.CONNECTED and len(payload) <= self._max_payload:
            command = pub_command(subject, reply, payload, headers)
        if command is None:
            await self.publish(
                subject, payload, reply=reply, headers=dict(headers) if headers else None
            )
            return
        stats = self.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(payload)
        self._pending.append(command)
        self._pending_data_size += len(command)
        if self._max_pending_size > 0 and self._pending_data_size > self._max_pending_size:
            await self._flush_pending(force_flush=True)
        flush_queue = self._flush_queue
        if flush_queue is not None and flush_queue.empty():
            await self._flush_pending()

    async def _send_ping(self, future: asyncio.Future[bool] | None = None) -> None:
        # nats-py writes a PING straight to the socket, ahead of the commands still waiting
        # for its flusher task (a SUB just sent, say): the PONG of a `flush` then does not mean
        # that the server has them, and a subscription "confirmed" so could miss the messages
        # published right after. Here the PING goes behind them.
        if self._status != Client.CONNECTED or self._flush_queue is None:
            await super()._send_ping(future)
            return
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        self._pending.append(_PING)
        self._pending_data_size += len(_PING)
        await self._flush_pending()

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._inline.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._inline.get(sid)
        if handler is None or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        hdr = await self._process_headers(headers) if headers else None
        msg = self._build_message(sid, subject, reply, data, hdr)
        try:
            handler(msg)
        except Exception:
            logger.exception("subscriber %r failed on %r", handler, msg.subject)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:  # a malformed name: skipped, as nats-py does
                continue
            if _WHITESPACE.search(key) is None:
                out[key] = value.strip().decode("utf-8", "replace")
        return out


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish (an acknowledgement, or an API error)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_pub_ack = msgspec.json.Decoder(_PubAck)
_JS_TIMEOUT = 5.0
"""Seconds a JetStream publish waits for its acknowledgement (nats-py's default)."""


class _Requests:
    """Requests answered on one wildcard inbox of ours: core requests and JetStream publishes.

    What nats-py's ``request`` (and ``JetStreamContext.publish``, a request) does on its reply
    mux, without a random token, an ``asyncio.wait_for`` and, for publishes, a JSON decode into
    dataclasses each time: those were a fifth of a busy coordinator's time, which publishes
    about ten times per workflow, and as much of a client's.
    """

    def __init__(self, nc: _Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[NatsMsg]] = {}

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe_inline(self._prefix + "*", self._on_reply)

    def _on_reply(self, msg: NatsMsg) -> None:
        future = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(
        self, subject: str, data: bytes, headers: dict[str, str] | None, timeout: float
    ) -> NatsMsg:
        """The reply; nats-py's ``NoRespondersError`` or ``TimeoutError`` when none comes."""
        token = str(next(self._ids))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[NatsMsg] = loop.create_future()
        self._pending[token] = future
        timer = loop.call_later(timeout, _time_out, future)
        try:
            await self._nc.send(subject, data, self._prefix + token, headers)
            msg = await future
        finally:
            timer.cancel()
            self._pending.pop(token, None)
        if not msg.data and msg.headers and msg.headers.get(api.Header.STATUS) == "503":
            raise nats.errors.NoRespondersError
        return msg

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> _PubAck:
        """Publish into a stream; its acknowledgement, or nats-py's error for what went wrong
        (``NoStreamResponseError``: no stream captures the subject)."""
        try:
            msg = await self.request(subject, data, headers, _JS_TIMEOUT)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        ack = _pub_ack.decode(msg.data)
        if ack.error is not None:
            raise nats.js.errors.APIError.from_error(ack.error)
        return ack


def _time_out(future: asyncio.Future[NatsMsg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


class NatsTransport(Transport):
    """The transport contract over NATS: core subjects, JetStream work queues and buckets.

    ``servers`` and ``connect_options`` go to nats-py's ``connect`` (credentials, TLS,
    reconnection settings, callbacks, ...); ``name`` labels the connection in the server's
    monitoring. Entering connects (nats-py retries a first connection as it does reconnections:
    ``max_reconnect_attempts`` times, ``reconnect_time_wait`` apart, two minutes by default);
    leaving stops the consumers and drains the connection. Connection errors are logged as
    one-line warnings unless an ``error_cb`` is given.

    What NATS adds to the contract:

    * Delivery is asynchronous: handlers run in nats-py's tasks, one task per subscription (so
      per subscription in order), after ``publish`` has returned. ``subscribe`` returns once the
      server has the subscription, so it hears messages published afterwards by anyone.
    * Work queues are streams with file storage; ``QueueConfig.max_deliver`` and ``ack_wait``
      live on the durables (pull consumers) and are recorded in the stream's metadata, so a
      durable created later, by any process, gets them. A message that runs out of deliveries
      is removed from the stream and logged. A ``duplicate_window`` of 0 becomes nats-server's
      shortest, 0.1 s.
    * A bucket is the stream ``KV_<bucket>`` (nats-py's and the ``nats`` CLI's layout, so both
      can read it). A key's own ttl is the ``Nats-TTL`` header of its entries, in whole seconds
      rounded up; the bucket's ttl is the stream's ``max_age``, which also caps a key's own ttl.
      ``delete`` leaves a marker that expires after a minute.
    """

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        name: str | None = None,
        **connect_options: Any,
    ) -> None:
        self._servers = servers
        self._name = name
        self._options = connect_options
        self._nc: _Client | None = None
        self._js: JetStreamContext | None = None
        self._requests: _Requests | None = None
        self._task_group: TaskGroup | None = None
        self._consumers: set[_NatsConsumer] = set()
        self._used = False
        self._open = False

    def __repr__(self) -> str:
        state = "open" if self._open else "closed" if self._used else "new"
        return f"<NatsTransport {self._servers!r} {state}>"

    async def __aenter__(self) -> Self:
        if self._used:
            raise TransportError("a NatsTransport can be entered only once; make a new one")
        self._used = True
        options = dict(self._options)
        options.setdefault("error_cb", _log_connection_error)
        user_reconnected = options.pop("reconnected_cb", None)

        async def reconnected() -> None:
            # Pull requests do not survive the connection: ask again.
            for consumer in list(self._consumers):
                consumer.reset()
            if user_reconnected is not None:
                await user_reconnected()

        nc = _Client()
        try:
            with _mapped(f"cannot connect to NATS at {self._servers!r}"):
                await nc.connect(
                    self._servers, name=self._name, reconnected_cb=reconnected, **options
                )
        except BaseException:
            # A refused login (or a timeout) can leave nats-py's socket open: close it.
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._nc = nc
        self._js = nc.jetstream()
        requests = _Requests(nc)
        try:
            with _mapped("cannot subscribe to the reply inbox"):
                await requests.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._requests = requests
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
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
        for consumer in list(self._consumers):
            await consumer.stop()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except (nats.errors.Error, OSError):
                await nc.close()  # reconnecting: nothing to drain
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)

    @property
    def nats_client(self) -> Client:
        """The connected nats-py client, for what the contract leaves out (service discovery).

        Raises ``TransportError`` outside ``async with transport:``.
        """
        return self._client()

    # --- core messaging ---------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        reply: str | None = None,
    ) -> None:
        nc = self._client()
        check_subject(subject)
        if reply:
            check_subject(reply)
        try:
            await nc.send(subject, data, reply or "", headers or None)
        except nats.errors.Error as error:
            raise _translate(f"cannot publish on {subject!r}", error) from error

    async def subscribe(
        self, subject: str, handler: Handler, *, queue: str | None = None
    ) -> Subscription:
        nc = self._client()
        compile_pattern(subject)
        if queue is not None and not queue:
            raise ValueError("queue group name must not be empty")

        def deliver(m: NatsMsg) -> None:
            handler(Msg(m.subject, m.data, m.headers, m.reply or None))

        with _mapped(f"cannot subscribe to {subject!r}"):
            sub = await nc.subscribe_inline(subject, deliver, queue=queue or "")
        subscription = _NatsSubscription(sub, subject)
        try:
            # Once the server has it, messages from any connection reach it: a caller may now
            # ask others to publish (start a workflow, then hear its events).
            await nc.flush()
        except nats.errors.Error as error:
            await subscription.unsubscribe()
            raise _translate(f"subscription to {subject!r} not confirmed", error) from error
        return subscription

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Msg:
        requests = self._requesting()
        check_subject(subject)
        try:
            reply = await requests.request(
                subject, data, dict(headers) if headers else None, timeout
            )
        except nats.errors.NoRespondersError as error:
            raise NoRespondersError(
                f"no responders on {subject!r}: nobody subscribes to it"
            ) from error
        except nats.errors.TimeoutError as error:
            raise RequestTimeoutError(f"no reply on {subject!r} within {timeout} s") from error
        except nats.errors.Error as error:
            raise _translate(f"request on {subject!r} failed", error) from error
        return Msg(reply.subject, reply.data, reply.headers)

    # --- logs ---------------------------------------------------------------------------------

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
        js = self._jetstream()
        check_replicas(replicas)
        check_log(memory, max_bytes)
        limit = -1 if max_bytes is None else max_bytes
        config = api.StreamConfig(
            name=name,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.MEMORY if memory else api.StorageType.FILE,
            subjects=list(subjects),
            max_age=max_age,
            max_bytes=limit,
            discard=api.DiscardPolicy.OLD,
            num_replicas=replicas,
        )
        with _mapped(f"cannot create or update log {name!r}"):
            try:
                await js.add_stream(config)
            except nats.js.errors.APIError as error:
                if error.err_code != _STREAM_NAME_IN_USE:
                    raise
                # A stream's storage is fixed when it is made: an existing log keeps its own.
                current = (await js.stream_info(name)).config
                await js.update_stream(
                    current.evolve(subjects=list(subjects), max_age=max_age, max_bytes=limit)
                )

    # --- work queues ------------------------------------------------------------------------

    async def ensure_queue(self, config: QueueConfig) -> None:
        js = self._jetstream()
        what = f"cannot create or update queue {config.name!r}"
        metadata = {_MAX_DELIVER: str(config.max_deliver), _ACK_WAIT: repr(config.ack_wait)}
        subjects = list(config.subjects)
        window = max(config.duplicate_window, _MIN_DUPLICATE_WINDOW)
        try:
            with _mapped(what):
                try:
                    await js.add_stream(
                        api.StreamConfig(
                            name=config.name,
                            retention=api.RetentionPolicy.WORK_QUEUE,
                            storage=api.StorageType.FILE,
                            subjects=subjects,
                            duplicate_window=window,
                            metadata=metadata,
                            num_replicas=config.replicas,
                        )
                    )
                    return
                except nats.js.errors.APIError as error:
                    if error.err_code != _STREAM_NAME_IN_USE:
                        raise
                info = await js.stream_info(config.name)
                current = info.config
                if current.retention != api.RetentionPolicy.WORK_QUEUE:
                    raise TransportError(
                        f"{what}: stream {config.name!r} exists and is not a work queue"
                    )
                # Start from the stream's own configuration: what we do not set (replicas,
                # limits, placement) stays as whoever deployed it chose.
                await js.update_stream(
                    current.evolve(
                        subjects=subjects,
                        duplicate_window=window,
                        metadata={**(current.metadata or {}), **metadata},
                    )
                )
                for consumer in await js.consumers_info(config.name):
                    settings = consumer.config
                    if settings.durable_name and (
                        settings.max_deliver != config.max_deliver
                        or _seconds(settings.ack_wait) != _seconds(config.ack_wait)
                    ):
                        await js.add_consumer(
                            config.name,
                            settings.evolve(
                                max_deliver=config.max_deliver, ack_wait=config.ack_wait
                            ),
                        )
        except TransportError as error:
            cause = error.__cause__
            if isinstance(cause, nats.js.errors.APIError) and cause.err_code == _STREAM_OVERLAP:
                raise TransportError(
                    f"subjects {config.subjects} of queue {config.name!r} overlap those of "
                    f"another queue or bucket: a subject may belong to one stream only"
                ) from cause
            raise

    async def enqueue(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> bool:
        requests = self._requesting()
        check_subject(subject)
        fields = dict(headers) if headers else {}
        if msg_id is not None:
            fields[api.Header.MSG_ID.value] = msg_id
        try:
            ack = await requests.publish(subject, data, fields or None)
        except nats.js.errors.NoStreamResponseError as error:
            raise TransportError(
                f"no queue captures subject {subject!r}: call ensure_queue first"
            ) from error
        except nats.errors.Error as error:
            raise _translate(f"cannot enqueue on {subject!r}", error) from error
        return not ack.duplicate

    async def consume(
        self,
        queue: str,
        durable: str,
        filter_subject: str,
        handler: WorkHandler,
        *,
        max_in_flight: int = 64,
    ) -> Consumer:
        js = self._jetstream()
        check_name("durable", durable)
        pattern = compile_pattern(filter_subject)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        with _mapped(f"cannot consume from queue {queue!r}"):
            try:
                stream = await js.stream_info(queue)
            except nats.js.errors.NotFoundError as error:
                raise TransportError(f"no queue {queue!r}: call ensure_queue first") from error
            if stream.config.retention != api.RetentionPolicy.WORK_QUEUE:
                raise TransportError(f"stream {queue!r} is not a work queue")
            subjects = stream.config.subjects or []
            if not any(collide(pattern, compile_pattern(s)) for s in subjects):
                raise TransportError(
                    f"filter {filter_subject!r} captures none of queue {queue!r}'s subjects "
                    f"{tuple(subjects)}"
                )
            metadata = stream.config.metadata or {}
            config = api.ConsumerConfig(
                durable_name=durable,
                filter_subject=filter_subject,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=float(metadata.get(_ACK_WAIT, _DEFAULTS.ack_wait)),
                max_deliver=int(metadata.get(_MAX_DELIVER, _DEFAULTS.max_deliver)),
                max_ack_pending=-1,  # each consume call bounds its own deliveries
            )
            try:
                existing = (await js.consumer_info(queue, durable)).config
            except nats.js.errors.NotFoundError:
                try:
                    existing = (await js.add_consumer(queue, config)).config
                except nats.js.errors.APIError as error:
                    raise _translate(
                        f"cannot create durable {durable!r} filtering {filter_subject!r} on "
                        f"queue {queue!r} (durables of a queue must not overlap)",
                        error,
                    ) from error
            filters = existing.filter_subjects or [existing.filter_subject]
            if filters != [filter_subject]:
                raise TransportError(
                    f"durable {durable!r} of queue {queue!r} filters {filters}, "
                    f"not {filter_subject!r}"
                )
            # Deliveries time out by the durable's ack_wait, whatever the stream records.
            ack_wait = existing.ack_wait or config.ack_wait or _DEFAULTS.ack_wait
            consumer = _NatsConsumer(self, queue, config, ack_wait, handler, max_in_flight)
            await consumer.start()
        self._consumers.add(consumer)
        assert self._task_group is not None
        self._task_group.start_soon(consumer.run, name=f"pull {queue}/{durable}")
        return consumer

    # --- key-value --------------------------------------------------------------------------

    async def open_kv(
        self, bucket: str, *, ttl: float | None = None, history: int = 1, replicas: int = 1
    ) -> KeyValue:
        js = self._jetstream()
        check_bucket(bucket)
        check_settings(ttl, history)
        check_replicas(replicas)
        stream = f"KV_{bucket}"

        def tuned(config: api.StreamConfig) -> api.StreamConfig:
            return config.evolve(
                max_age=ttl or 0,
                max_msgs_per_subject=history,
                # The server wants the window no longer than max_age.
                duplicate_window=min(120.0, ttl) if ttl else 120.0,
                allow_msg_ttl=True,
                allow_rollup_hdrs=True,
            )

        with _mapped(f"cannot open bucket {bucket!r}"):
            try:
                info = await js.add_stream(
                    tuned(
                        api.StreamConfig(
                            name=stream,
                            subjects=[f"$KV.{bucket}.>"],
                            storage=api.StorageType.FILE,
                            discard=api.DiscardPolicy.NEW,
                            allow_direct=True,
                            deny_delete=True,
                            max_msgs=-1,
                            max_bytes=-1,
                            max_consumers=-1,
                            num_replicas=replicas,
                        )
                    )
                )
            except nats.js.errors.APIError as error:
                if error.err_code != _STREAM_NAME_IN_USE:
                    raise
                # It exists with other settings: change only ours (see ensure_queue).
                info = await js.stream_info(stream)
                current = info.config
                if (
                    _seconds(current.max_age) != _seconds(ttl)
                    or current.max_msgs_per_subject != history
                    or not current.allow_msg_ttl
                    or not current.allow_rollup_hdrs
                ):
                    info = await js.update_stream(tuned(current))
        return _NatsKeyValue(
            self._client(), js, self._requesting(), bucket, direct=bool(info.config.allow_direct)
        )

    # --- helpers ----------------------------------------------------------------------------

    def _client(self) -> _Client:
        nc = self._nc
        if nc is None or not self._open:
            raise self._closed()
        return nc

    def _requesting(self) -> _Requests:
        requests = self._requests
        if requests is None or not self._open:
            raise self._closed()
        return requests

    def _jetstream(self) -> JetStreamContext:
        js = self._js
        if js is None or not self._open:
            raise self._closed()
        return js

    def _closed(self) -> TransportError:
        if self._used:
            return TransportError("the transport is closed")
        return TransportError("the transport is not open: use it inside `async with transport:`")


# --- work queues ----------------------------------------------------------------------------


class _NatsWorkMsg(WorkMsg):
    """One delivery from a pull consumer; it holds one of its consume call's slots."""

    __slots__ = (
        "_consumer",
        "_delivered",
        "_holds_slot",
        "_msg",
        "_reply",
        "_timer",
        "data",
        "headers",
        "subject",
    )

    def __init__(self, consumer: _NatsConsumer, msg: NatsMsg) -> None:
        self.subject = msg.subject
        self.data = msg.data
        self.headers = msg.headers
        self._msg = msg
        self._delivered: int | None = None
        self._consumer = consumer
        self._reply = msg.reply
        self._holds_slot = True
        self._timer: asyncio.TimerHandle | None = None

    @property  # an attribute in the contract, computed when read here
    def num_delivered(self) -> int:  # type: ignore[override]
        # Parsed from the reply subject when asked (coordinators never ask).
        if self._delivered is None:
            # nats-py's `metadata` builds a dataclass, its sequences and a datetime for this.
            tokens = NatsMsg.Metadata._get_metadata_fields(self._reply)
            v1 = len(tokens) == _V1_ACK_TOKENS
            self._delivered = int(tokens[4] if v1 else tokens[NatsMsg.Ack.NumDelivered])
        return self._delivered

    async def ack(self) -> None:
        await self._send(b"+ACK")
        self._release()

    async def nak(self, delay: float | None = None) -> None:
        if delay is not None and delay > 0:
            await self._send(b"-NAK " + json.dumps({"delay": _seconds(delay)}).encode())
        else:
            await self._send(b"-NAK")
        self._release()

    async def in_progress(self) -> None:
        await self._send(b"+WPI")
        if self._holds_slot:
            self._arm()

    async def term(self) -> None:
        await self._send(b"+TERM")
        self._release()

    def __repr__(self) -> str:
        return f"<NatsWorkMsg {self.subject!r} #{self.num_delivered}>"

    async def _send(self, payload: bytes) -> None:
        nc = self._consumer.transport._nc
        if nc is None:
            raise TransportError("the transport is closed: the delivery can no longer be settled")
        try:
            await nc.send(self._reply, payload)
        except nats.errors.Error as error:  # the text only now: repr parses the reply subject
            raise _translate(f"cannot settle {self!r}", error) from error

    def _arm(self) -> None:
        """Free the slot when ``ack_wait`` runs out, as the server then redelivers."""
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._consumer.ack_wait, self._release)

    def _release(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._consumer.release()


class _NatsConsumer(Consumer):
    """One ``consume`` call: its own inbox, pull requests and in-flight budget on a durable.

    The pull loop keeps ``in_flight + credits <= max_in_flight``, where ``credits`` counts the
    messages the server may still send for our pending pull requests: every message delivered
    spends one, a request's expiry (status 408) returns those it did not use. Settling a
    delivery, or its ``ack_wait`` running out, frees a slot; the loop then asks for more, once a
    quarter of the slots (or any, if nothing is requested) are free, so a busy consumer sends
    one request per few messages rather than one per message.

    Two approximations: the slot of a delivery is freed after the ``ack_wait`` the durable had
    when ``consume`` was called (``ensure_queue`` changing it applies to later calls); and when
    pull requests are taken for lost (reconnection, missed heartbeats, a refused request) but
    were not, the server may still send their messages, briefly exceeding ``max_in_flight``.
    """

    __slots__ = (
        "_advisory",
        "_credits",
        "_handler",
        "_in_flight",
        "_inbox",
        "_max",
        "_next",
        "_pause",
        "_recreate",
        "_resume_at",
        "_scope",
        "_seen",
        "_stopped",
        "_sub",
        "_threshold",
        "_wake",
        "ack_wait",
        "config",
        "stream",
        "transport",
    )

    def __init__(
        self,
        transport: NatsTransport,
        stream: str,
        config: api.ConsumerConfig,
        ack_wait: float,
        handler: WorkHandler,
        max_in_flight: int,
    ) -> None:
        assert config.durable_name is not None
        self.transport = transport
        self.stream = stream
        self.config = config
        self.ack_wait = ack_wait
        self._handler = handler
        self._max = max_in_flight
        self._threshold = max(1, max_in_flight // 4)
        self._next = f"{_API}.CONSUMER.MSG.NEXT.{stream}.{config.durable_name}"
        self._inbox = ""
        self._sub: NatsSubscription | None = None
        self._advisory: NatsSubscription | None = None
        self._credits = 0
        self._in_flight = 0
        self._seen = time.monotonic()  # the last sign of life of our pull requests
        self._pause = 0.0  # the backoff after the last failure, doubled on each failure
        self._resume_at = 0.0  # no pulling before this (monotonic) time
        self._recreate = False
        self._stopped = False
        self._wake = asyncio.Event()
        self._scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<NatsConsumer {self.stream}/{self.config.durable_name}>"

    async def start(self) -> None:
        nc = self.transport._client()
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe_inline(self._inbox, self._on_message)
        self._advisory = await nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.config.durable_name}",
            cb=self._on_exhausted,
        )

    async def stop(self) -> None:
        self._stopped = True
        self.transport._consumers.discard(self)
        if self._scope is not None:
            self._scope.cancel()
        # Without our inbox, the server drops our pending pull requests: the next message goes
        # to another consumer rather than to a request nobody listens to any more.
        for sub in (self._sub, self._advisory):
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):  # closed: nothing to undo
                    await sub.unsubscribe()
        self._sub = self._advisory = None

    def release(self) -> None:
        """A delivery was settled or timed out: its slot is free."""
        self._in_flight -= 1
        self._wake.set()

    def reset(self) -> None:
        """Our pull requests are gone (reconnection, missed heartbeats): pull anew."""
        self._credits = 0
        self._wake.set()

    async def run(self) -> None:
        """The pull loop, until ``stop``: top up pull requests as slots free up; watch them."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            while not self._stopped:
                try:
                    await self._turn()
                except Exception:
                    logger.exception("pull loop of %r failed; retrying", self)
                    self._failed()

    async def _turn(self) -> None:
        self._wake.clear()
        wait = self._resume_at - time.monotonic()
        if wait > 0:
            await anyio.sleep(wait)
        if self._recreate:
            js = self.transport._jetstream()
            await js.add_consumer(self.stream, self.config)
            self._recreate = False
        free = self._max - self._in_flight - self._credits
        if free > 0 and (free >= self._threshold or not self._credits):
            await self._pull(free)
        with anyio.move_on_after(_PULL_HEARTBEAT):
            await self._wake.wait()
        if self._credits and time.monotonic() - self._seen > 2 * _PULL_HEARTBEAT + 1:
            logger.warning("%r: pull requests unanswered, presumed lost; pulling anew", self)
            self.reset()

    async def _pull(self, batch: int) -> None:
        request = {
            "batch": batch,
            "expires": _seconds(_PULL_EXPIRES),
            "idle_heartbeat": _seconds(_PULL_HEARTBEAT),
        }
        nc = self.transport._client()
        await nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        if not self._credits:
            self._seen = time.monotonic()
        self._credits += batch

    def _failed(self) -> None:
        """Pause before the next pull, longer after each failure in a row."""
        first, longest = _PULL_BACKOFF
        self._pause = min(longest, self._pause * 2) if self._pause else first
        self._resume_at = time.monotonic() + self._pause

    def _on_message(self, msg: NatsMsg) -> None:
        self._seen = time.monotonic()
        if msg.reply:
            self._deliver(msg)
        else:
            self._on_status(msg.headers or {})

    def _deliver(self, msg: NatsMsg) -> None:
        if self._credits:
            self._credits -= 1
        self._pause = 0.0
        self._in_flight += 1
        work = _NatsWorkMsg(self, msg)
        work._arm()
        try:
            self._handler(work)
        except Exception:
            logger.exception("work handler failed on %r (it will be redelivered)", work)

    def _on_status(self, headers: Mapping[str, str]) -> None:
        status = headers.get(_STATUS)
        if status == _STATUS_HEARTBEAT:
            self._pause = 0.0  # the server holds our request: whatever failed works again
            return
        pending = headers.get(_PENDING_MESSAGES)
        if status in (_STATUS_TIMEOUT, _STATUS_CONFLICT) and pending is not None:
            # One request ended (expired, or the leader changed) without using these credits.
            self._pause = 0.0
            self._credits = max(0, self._credits - int(pending))
            self._wake.set()
            return
        # The request was refused (no such consumer, too many waiting requests, ...): we cannot
        # tell which credits died with it, so count none as pending and pull again, later.
        description = next(
            (v for k, v in headers.items() if k == api.Header.DESCRIPTION), "no description"
        )
        logger.warning("%r: pull request failed (%s %s)", self, status, description)
        if status == "503" or description == "Consumer Deleted":
            self._recreate = True
        self._failed()
        self.reset()

    async def _on_exhausted(self, msg: NatsMsg) -> None:
        # JetStream keeps a message that ran out of deliveries in a work-queue stream, where no
        # one will ever read it: drop it, as the contract says.
        try:
            advisory = json.loads(msg.data)
            sequence, deliveries = int(advisory["stream_seq"]), advisory.get("deliveries")
        except (ValueError, KeyError, TypeError):
            return
        try:
            await self.transport._jetstream().delete_msg(self.stream, sequence)
        except nats.js.errors.APIError as error:
            if error.err_code != _NO_MESSAGE:  # another consumer dropped it first
                logger.warning("%r: cannot drop exhausted message %d: %s", self, sequence, error)
            return
        except (nats.errors.Error, TransportError):
            return
        logger.warning(
            "queue %s dropped message %d after %s deliveries", self.stream, sequence, deliveries
        )


# --- key-value ------------------------------------------------------------------------------


class _NatsKeyValue(KeyValue):
    """A bucket: the stream ``KV_<bucket>``, one subject ``$KV.<bucket>.<key>`` per key.

    A key's own ttl is the ``Nats-TTL`` header of each of its entries, so ``put`` and ``update``
    must know the current entry's ttl to keep it. Revisions never change, so the handle
    remembers, per key, the latest revision it saw and that entry's ttl: ``update`` from that
    revision (the usual read-modify-write) and ``put`` after it need no extra read; otherwise
    they read the entry first. ``put`` writes with compare-and-set against the revision whose
    ttl it kept, so a concurrent ``create`` with another ttl is never overwritten with the
    wrong one.

    ``delete`` writes a purge marker (which also drops the key's history) with a ttl of its own,
    so deleted keys do not pile up markers forever.
    """

    __slots__ = ("_direct", "_js", "_known", "_nc", "_prefix", "_requests", "_stream", "bucket")

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        requests: _Requests,
        bucket: str,
        *,
        direct: bool,
    ) -> None:
        self._nc = nc
        self._js = js
        self._requests = requests
        self.bucket = bucket
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._direct = direct
        self._known: dict[str, tuple[int, str | None]] = {}  # key -> (revision, Nats-TTL)

    def __repr__(self) -> str:
        return f"<NatsKeyValue {self.bucket!r}>"

    async def get(self, key: str) -> Entry | None:
        check_key_cached(key)
        try:
            raw = await self._latest(key)
        except nats.errors.Error as error:
            raise self._failure(f"cannot read key {key!r}", error) from error
        if raw is None:
            return None
        assert raw.seq is not None
        return Entry(key, raw.data or b"", raw.seq)

    async def put(self, key: str, value: bytes) -> int:
        check_key_cached(key)
        with self._mapped(f"cannot write key {key!r}"):
            known = self._known.get(key)
            for _ in range(_CAS_ATTEMPTS):
                if known is None:
                    raw = await self._raw(key)
                    if raw is None:
                        known = (0, None)
                    else:  # a deletion marker's ttl is no key's ttl
                        ttl = None if self._is_marker(raw) else self._ttl_of(raw)
                        known = (raw.seq or 0, ttl)
                revision, ttl = known
                try:
                    return await self._write(key, value, expect=revision, ttl=ttl)
                except RevisionMismatchError:
                    known = None  # written meanwhile: read it again
        raise TransportError(f"cannot write key {key!r}: too much contention on it")

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        check_key_cached(key)
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be positive seconds or None, not {ttl}")
        header = None if ttl is None else _ttl_header(ttl)
        expect = 0
        try:
            for _ in range(_CAS_ATTEMPTS):
                try:
                    return await self._write(key, value, expect=expect, ttl=header)
                except RevisionMismatchError:
                    pass
                # Present, or gone but for a deletion marker that we may write over.
                raw = await self._raw(key)
                if raw is not None and not self._is_marker(raw):
                    raise KeyExistsError(
                        f"key {key!r} already exists in bucket {self.bucket!r} (revision {raw.seq})"
                    )
                expect = 0 if raw is None else raw.seq or 0
        except nats.errors.Error as error:
            raise self._failure(f"cannot create key {key!r}", error) from error
        raise TransportError(f"cannot create key {key!r}: too much contention on it")

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        check_key_cached(key)
        try:
            ttl = await self._ttl_at(key, last_revision)
            return await self._write(key, value, expect=last_revision, ttl=ttl)
        except nats.errors.Error as error:
            raise self._failure(f"cannot update key {key!r}", error) from error

    async def delete(self, key: str, *, last_revision: int | None = None) -> None:
        check_key_cached(key)
        headers = {
            _KV_OPERATION: "PURGE",
            api.Header.ROLLUP.value: "sub",
            _TTL: str(_MARKER_TTL),
        }
        try:
            if last_revision is not None:
                await self._ttl_at(key, last_revision)  # an absent key mismatches
                headers[_EXPECTED_LAST] = str(last_revision)
            self._known.pop(key, None)
            await self._publish(key, b"", headers, last_revision)
        except nats.errors.Error as error:
            raise self._failure(f"cannot delete key {key!r}", error) from error

    async def keys(self) -> list[str]:
        with self._mapped(f"cannot list the keys of bucket {self.bucket!r}"):
            return await self._keys()

    # --- reading ----------------------------------------------------------------------------

    async def _raw(self, key: str) -> api.RawStreamMsg | None:
        """The key's latest stream entry, deletion markers included, or None."""
        try:
            return await self._js.get_msg(
                self._stream, subject=self._prefix + key, direct=self._direct
            )
        except nats.js.errors.NotFoundError:
            return None

    async def _latest(self, key: str) -> api.RawStreamMsg | None:
        """The key's current value, or None; remembers its revision and ttl."""
        raw = await self._raw(key)
        if raw is None or self._is_marker(raw):
            self._known.pop(key, None)
            return None
        self._remember(key, raw.seq or 0, self._ttl_of(raw))
        return raw

    async def _ttl_at(self, key: str, revision: int) -> str | None:
        """The ttl of the key's entry at ``revision``; mismatch if that is no value of the key.

        Whether ``revision`` is still the key's latest is the compare-and-set's business.
        """
        known = self._known.get(key)
        if known is not None and known[0] == revision:
            return known[1]
        raw = None
        if revision > 0:
            try:
                raw = await self._js.get_msg(self._stream, seq=revision, direct=self._direct)
            except nats.js.errors.NotFoundError:
                raw = None
        if raw is None or raw.subject != self._prefix + key or self._is_marker(raw):
            raise RevisionMismatchError(
                f"key {key!r} in bucket {self.bucket!r} has no value at revision {revision}: "
                "read it again"
            )
        return self._ttl_of(raw)

    async def _keys(self) -> list[str]:
        # An ephemeral consumer delivering the latest entry of each key, headers only.
        consumer = await self._js.add_consumer(
            self._stream,
            api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=api.AckPolicy.NONE,
                filter_subject=self._prefix + ">",
                headers_only=True,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=30.0,
            ),
        )
        try:
            expected = consumer.num_pending or 0
            if not expected:
                return []
            return await self._read_keys(consumer.name or "", expected)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await self._js.delete_consumer(self._stream, consumer.name or "")

    async def _read_keys(self, consumer: str, expected: int) -> list[str]:
        nc = self._nc
        inbox = nc.new_inbox()
        received: asyncio.Queue[NatsMsg] = asyncio.Queue()
        sub = await nc.subscribe(inbox, cb=self._enqueue_to(received))
        keys: list[str] = []
        try:
            # Ask for exactly what was there when the consumer was made; no_wait ends the
            # request early (with a status) if some of it went meanwhile.
            request = {"batch": expected, "no_wait": True}
            await nc.publish(
                f"{_API}.CONSUMER.MSG.NEXT.{self._stream}.{consumer}",
                json.dumps(request).encode(),
                reply=inbox,
            )
            with anyio.fail_after(_KEYS_TIMEOUT):
                for _ in range(expected):
                    msg = await received.get()
                    if not msg.reply:  # a status: the request ended
                        break
                    headers = msg.headers or {}
                    if (
                        headers.get(_KV_OPERATION) not in _KV_DELETED
                        and _MARKER_REASON not in headers
                    ):
                        keys.append(msg.subject[len(self._prefix) :])
                    if msg.metadata.num_pending == 0:
                        break
        except TimeoutError as error:
            raise TransportError(
                f"bucket {self.bucket!r}: the key listing stalled (got {len(keys)} of {expected})"
            ) from error
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return keys

    @staticmethod
    def _enqueue_to(queue: asyncio.Queue[NatsMsg]) -> Callable[[NatsMsg], Awaitable[None]]:
        async def enqueue(msg: NatsMsg) -> None:
            queue.put_nowait(msg)

        return enqueue

    @staticmethod
    def _is_marker(raw: api.RawStreamMsg) -> bool:
        headers = raw.headers or {}
        return headers.get(_KV_OPERATION) in _KV_DELETED or _MARKER_REASON in headers

    @staticmethod
    def _ttl_of(raw: api.RawStreamMsg) -> str | None:
        return (raw.headers or {}).get(_TTL)

    # --- writing ----------------------------------------------------------------------------

    async def _write(self, key: str, value: bytes, *, expect: int, ttl: str | None) -> int:
        """Write with compare-and-set against revision ``expect`` (0: the key has no entry)."""
        headers = {_EXPECTED_LAST: str(expect)}
        if ttl is not None:
            headers[_TTL] = ttl
        revision = await self._publish(key, value, headers, expect)
        self._remember(key, revision, ttl)
        return revision

    async def _publish(
        self, key: str, value: bytes, headers: dict[str, str], expect: int | None
    ) -> int:
        try:
            ack = await self._requests.publish(self._prefix + key, value, headers)
        except nats.js.errors.APIError as error:
            if error.err_code in _WRONG_LAST_SEQUENCE:
                self._known.pop(key, None)
                raise RevisionMismatchError(
                    f"key {key!r} in bucket {self.bucket!r} is not at revision {expect}: "
                    "read it again"
                ) from error
            raise
        return ack.seq

    def _remember(self, key: str, revision: int, ttl: str | None) -> None:
        known = self._known
        if len(known) >= _KNOWN_KEYS and key not in known:
            known.clear()
        known[key] = (revision, ttl)

    def _failure(self, what: str, error: nats.errors.Error) -> TransportError:
        """The ``TransportError`` for one of nats-py's errors while doing ``what``."""
        if isinstance(error, nats.js.errors.NoStreamResponseError):
            return TransportError(
                f"bucket {self.bucket!r} does not exist (any more): open it with open_kv"
            )
        return _translate(f"bucket {self.bucket!r}: {what}", error)

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        try:
            yield
        except nats.errors.Error as error:
            raise self._failure(what, error) from error
