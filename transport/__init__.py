"""Moving bytes: the transport contract and its two implementations, memory and NATS.

``Transport`` is the contract (core publish/subscribe and request/reply, durable work queues,
key-value buckets); ``MemoryTransport`` implements it within one process, ``NatsTransport`` over
a nats-server with JetStream. ``NatsServer`` runs a local nats-server (tests, development). This
package imports nothing from ``orchestrator`` or ``actors``.
"""

from ._contract import Consumer as Consumer
from ._contract import Entry as Entry
from ._contract import Handler as Handler
from ._contract import KeyExistsError as KeyExistsError
from ._contract import KeyValue as KeyValue
from ._contract import Msg as Msg
from ._contract import NoRespondersError as NoRespondersError
from ._contract import QueueConfig as QueueConfig
from ._contract import RequestTimeoutError as RequestTimeoutError
from ._contract import RevisionMismatchError as RevisionMismatchError
from ._contract import Subscription as Subscription
from ._contract import Transport as Transport
from ._contract import TransportError as TransportError
from ._contract import WorkHandler as WorkHandler
from ._contract import WorkMsg as WorkMsg
from ._memory import MemoryTransport as MemoryTransport
from ._nats import NatsTransport as NatsTransport
from ._nats_server import NatsServer as NatsServer

__all__ = [
    "Consumer",
    "Entry",
    "Handler",
    "KeyExistsError",
    "KeyValue",
    "MemoryTransport",
    "Msg",
    "NatsServer",
    "NatsTransport",
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
