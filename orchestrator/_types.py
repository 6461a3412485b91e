"""Public value types: states, results, errors and lifecycle events, plus the shared codec."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = [
    "LifecycleEvent",
    "StepError",
    "StepInfo",
    "StepState",
    "TransactionState",
    "WorkflowResult",
]


class TransactionState(enum.StrEnum):
    """The state of a workflow transaction."""

    NOT_STARTED = "not_started"
    INVOKING = "invoking"
    WAITING_TO_COMPENSATE = "waiting_to_compensate"
    COMPENSATING = "compensating"
    DONE = "done"
    REVERTED = "reverted"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """True for the final states ``done``, ``reverted`` and ``failed``."""
        return self in _FINAL


_FINAL = frozenset({TransactionState.DONE, TransactionState.REVERTED, TransactionState.FAILED})


class StepState(enum.StrEnum):
    """The state of one step of a transaction (invoke side, then compensation side)."""

    NOT_STARTED = "not_started"
    INVOKING = "invoking"
    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"
    SKIPPED_FAILURE = "skipped_failure"
    COMPENSATING = "compensating"
    REVERTED = "reverted"


class StepError(msgspec.Struct, frozen=True, kw_only=True):
    """One error of a run: an invoke or a compensation that failed for good."""

    step: str
    action: str
    type: str
    message: str
    traceback: str = ""
    attempt: int = 0


class StepInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a run did with one step."""

    name: str
    state: StepState
    attempts: int = 0
    compensate_attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from the first start to the last finish, when both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class WorkflowResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of a run (or its current picture, for a run still going)."""

    workflow: str
    transaction_id: str
    state: TransactionState
    result: Any = None
    errors: tuple[StepError, ...] = ()
    steps: tuple[StepInfo, ...] = ()
    created_at: float | None = None
    finished_at: float | None = None

    @property
    def step_table(self) -> dict[str, StepInfo]:
        """The steps by name."""
        return {s.name: s for s in self.steps}


class LifecycleEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A lifecycle event of a transaction (``begin``, ``step_success``, ``finish``...)."""

    type: str
    workflow: str
    transaction_id: str
    timestamp: float
    step: str | None = None
    attempt: int | None = None
    state: str | None = None
    error: StepError | None = None
    result: Any = None
    summary: WorkflowResult | None = None
    """On ``finish`` and ``suspend``: the transaction's whole picture (steps, errors, result)."""
