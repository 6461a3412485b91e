"""The error hierarchy: one root, a class per condition."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._types import WorkflowResult

__all__ = [
    "CompositionError",
    "ConfigurationError",
    "OrchestratorError",
    "PermanentFailure",
    "StepDeliveryError",
    "StepNotAwaitingError",
    "StepOutputError",
    "StepTimeoutError",
    "TransactionNotFoundError",
    "UnknownWorkflowError",
    "WorkflowFailedError",
    "WorkflowTimeoutError",
]


class OrchestratorError(Exception):
    """The root of every error this package raises on purpose."""


class CompositionError(OrchestratorError):
    """A workflow definition is invalid (raised at definition time, never at run time)."""


class ConfigurationError(OrchestratorError, ValueError):
    """An option has a value that cannot work (a negative retry count, an unknown name...)."""


class UnknownWorkflowError(ConfigurationError, LookupError):
    """A workflow name that the engine was not given."""


class TransactionNotFoundError(OrchestratorError, LookupError):
    """No live or retained transaction has this id (or idempotency key)."""


class StepNotAwaitingError(OrchestratorError):
    """An external completion names a step that is not waiting for one."""


class PermanentFailure(OrchestratorError):
    """Raised by a step handler to fail the step for good: no retries.

    ``compensate_input`` is what the step's own compensation receives.
    """

    def __init__(self, message: str = "Permanent failure", compensate_input: Any = None) -> None:
        super().__init__(message)
        self.compensate_input = compensate_input


class StepTimeoutError(OrchestratorError, TimeoutError):
    """A step ran longer than its ``timeout``; its handler was cancelled."""


class WorkflowTimeoutError(OrchestratorError, TimeoutError):
    """A workflow ran longer than its ``timeout``; it was compensated."""


class StepDeliveryError(OrchestratorError):
    """A step command was delivered ``max_deliver`` times and no worker ever answered it: each
    one crashed, was killed or stopped while the handler ran. The step fails for good."""


class StepOutputError(OrchestratorError, TypeError):
    """A step returned a value that msgspec cannot encode."""


class WorkflowFailedError(OrchestratorError):
    """A run ended ``reverted`` or ``failed`` with ``throw_on_error=True``.

    ``result`` is the full :class:`WorkflowResult`, errors and step table included.
    """

    def __init__(self, result: WorkflowResult) -> None:
        first = result.errors[0] if result.errors else None
        detail = (
            f": {first.step} ({first.action}) raised {first.type}: {first.message}" if first else ""
        )
        super().__init__(
            f"workflow {result.workflow!r} transaction {result.transaction_id!r} "
            f"ended {result.state.value}{detail}"
        )
        self.result = result
