"""The actor runtime and the two actor kinds: transaction coordinators and step executors."""

from ._gateway import Gateway as Gateway
from ._gateway import new_transaction_id as new_transaction_id
from ._gateway import parse_key as parse_key
from ._kvstore import KvStore as KvStore
from ._kvstore import StoreConflictError as StoreConflictError
from ._leases import LeaseLostError as LeaseLostError
from ._leases import PartitionLeases as PartitionLeases
from ._store import MemoryStore as MemoryStore
from ._store import Store as Store
from ._subjects import Subjects as Subjects
from ._subjects import token as token
from ._system import Actor as Actor
from ._system import ActorSystem as ActorSystem
from ._system import Directive as Directive
from ._system import Dispatcher as Dispatcher
from ._system import Mailbox as Mailbox
from ._system import Signal as Signal
from ._timers import Timers as Timers
from .coordinator import CoordinatorActor as CoordinatorActor
from .coordinator import CoordinatorHost as CoordinatorHost
from .executor import ExecutorHost as ExecutorHost
from .executor import StepExecutor as StepExecutor
from .messages import AbortStep as AbortStep
from .messages import Message as Message
from .messages import StartWorkflow as StartWorkflow
from .messages import StepCommand as StepCommand
from .messages import TxEvent as TxEvent
from .messages import TxEventBody as TxEventBody
from .messages import TxReply as TxReply
from .messages import decode_message as decode_message
from .messages import encode_message as encode_message

__all__ = [
    "AbortStep",
    "Actor",
    "ActorSystem",
    "CoordinatorActor",
    "CoordinatorHost",
    "Directive",
    "Dispatcher",
    "ExecutorHost",
    "Gateway",
    "KvStore",
    "LeaseLostError",
    "Mailbox",
    "MemoryStore",
    "Message",
    "PartitionLeases",
    "Signal",
    "StartWorkflow",
    "StepCommand",
    "StepExecutor",
    "Store",
    "StoreConflictError",
    "Subjects",
    "Timers",
    "TxEvent",
    "TxEventBody",
    "TxReply",
    "decode_message",
    "encode_message",
    "new_transaction_id",
    "parse_key",
    "token",
]
