"""The subject scheme of DESIGN.md section 5 (names under a configurable prefix)."""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from urllib.parse import unquote

from transport import QueueConfig

__all__ = ["DEFAULT_ACK_WAIT", "Subjects", "token", "untoken"]

DEFAULT_ACK_WAIT = 10.0
"""Seconds a work-queue delivery may stay unsettled before it is delivered again. Executors
report running handlers in progress, so only a dead process's deliveries wait this long."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-:]")


@lru_cache(maxsize=4096)
def token(name: str) -> str:
    """``name`` as one subject token: characters NATS gives a meaning (``.``, ``*``, ``>``,
    whitespace) and ``%`` are percent-encoded, so any step or transaction name is safe."""
    if _UNSAFE.search(name) is None:
        return name
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)


def untoken(text: str) -> str:
    """The name a :func:`token` stands for."""
    return unquote(text) if "%" in text else text


class Subjects:
    """Subject names for one deployment prefix."""

    __slots__ = ("partitions", "prefix")

    def __init__(self, prefix: str = "orch", partitions: int = 16) -> None:
        if not prefix or _UNSAFE.search(prefix.replace(".", "")):
            raise ValueError(f"invalid subject prefix {prefix!r}")
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.prefix = prefix
        self.partitions = partitions

    def partition(self, transaction_id: str) -> int:
        """The stable partition of a transaction."""
        return zlib.crc32(transaction_id.encode()) % self.partitions

    def start(self, workflow: str) -> str:
        return f"{self.prefix}.start.{token(workflow)}"

    def tx(self, transaction_id: str) -> str:
        return f"{self.prefix}.tx.{self.partition(transaction_id)}"

    def tx_partition(self, partition: int) -> str:
        """The subject of every transaction of one partition."""
        return f"{self.prefix}.tx.{partition}"

    def result(self, partition: int) -> str:
        """The core subject where the owner of a partition takes step results straight from
        the workers (a request, answered once the result is applied and persisted)."""
        return f"{self.prefix}.result.{partition}"

    @property
    def results(self) -> str:
        """Every partition's :meth:`result` subject."""
        return f"{self.prefix}.result.*"

    def step(self, step: str) -> str:
        return f"{self.prefix}.step.{token(step)}"

    def control(self, step: str) -> str:
        return f"{self.prefix}.ctl.{token(step)}"

    def event(self, workflow: str, transaction_id: str) -> str:
        return f"{self.prefix}.evt.{token(workflow)}.{token(transaction_id)}"

    def event_pattern(self, workflow: str | None, transaction_id: str | None) -> str:
        """Events of one workflow and/or transaction (``None``: any)."""
        wf = "*" if workflow is None else token(workflow)
        tx = "*" if transaction_id is None else token(transaction_id)
        return f"{self.prefix}.evt.{wf}.{tx}"

    def hook(self, workflow: str, hook: str) -> str:
        return f"{self.prefix}.hook.{token(workflow)}.{token(hook)}"

    def api(self, verb: str) -> str:
        return f"{self.prefix}.api.{verb}"

    @property
    def work_subjects(self) -> tuple[str, ...]:
        """What the work-queue stream carries."""
        p = self.prefix
        return (f"{p}.start.*", f"{p}.tx.*", f"{p}.step.*")

    @property
    def names(self) -> str:
        """The prefix as a stream or bucket name part (``orch`` -> ``orch``)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.prefix)

    @property
    def work_queue(self) -> str:
        """The work-queue stream: ``ORCH_WORK`` for the default prefix."""
        return f"{self.names.upper()}_WORK"

    @property
    def event_log(self) -> str:
        """The stream that keeps lifecycle events: ``ORCH_EVENTS`` for the default prefix."""
        return f"{self.names.upper()}_EVENTS"

    @property
    def logs(self) -> dict[str, tuple[str, ...]]:
        """The streams that keep lifecycle events and hook payloads: name -> subjects."""
        p, upper = self.prefix, self.names.upper()
        return {self.event_log: (f"{p}.evt.>",), f"{upper}_HOOKS": (f"{p}.hook.>",)}

    def work_queue_config(self, *, ack_wait: float = 30.0, replicas: int = 1) -> QueueConfig:
        """The work queue: starts, transaction messages and step commands.

        Deliveries are not capped: a message that cannot be handled is terminated by whoever
        reads it, and a redelivered step command is run again (its result is deduplicated).
        ``replicas``: copies a NATS cluster keeps, when the queue is created.
        """
        return QueueConfig(
            name=self.work_queue,
            subjects=self.work_subjects,
            max_deliver=-1,
            ack_wait=ack_wait,
            replicas=replicas,
        )
