"""An asyncio-native, actor-based orchestrator for workflows with compensation (sagas).

A Python re-creation of Medusa's workflows SDK: compose steps (an action and an optional
compensation) into workflows, run them in-process with :class:`LocalEngine`, or on NATS services.
"""

from typing import TYPE_CHECKING, Any

from ._composer import Hook as Hook
from ._composer import Workflow as Workflow
from ._composer import WorkflowData as WorkflowData
from ._composer import WorkflowResponse as WorkflowResponse
from ._composer import create_hook as create_hook
from ._composer import create_workflow as create_workflow
from ._composer import parallelize as parallelize
from ._composer import transform as transform
from ._composer import when as when
from ._errors import CompositionError as CompositionError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import OrchestratorError as OrchestratorError
from ._errors import PermanentFailure as PermanentFailure
from ._errors import StepDeliveryError as StepDeliveryError
from ._errors import StepNotAwaitingError as StepNotAwaitingError
from ._errors import StepOutputError as StepOutputError
from ._errors import StepTimeoutError as StepTimeoutError
from ._errors import TransactionNotFoundError as TransactionNotFoundError
from ._errors import UnknownWorkflowError as UnknownWorkflowError
from ._errors import WorkflowFailedError as WorkflowFailedError
from ._errors import WorkflowTimeoutError as WorkflowTimeoutError
from ._step import Step as Step
from ._step import StepConfig as StepConfig
from ._step import StepContext as StepContext
from ._step import StepResponse as StepResponse
from ._step import create_step as create_step
from ._types import LifecycleEvent as LifecycleEvent
from ._types import StepError as StepError
from ._types import StepInfo as StepInfo
from ._types import StepState as StepState
from ._types import TransactionState as TransactionState
from ._types import WorkflowResult as WorkflowResult

if TYPE_CHECKING:
    from ._client import Client as Client
    from ._client import connect as connect
    from ._local import LocalEngine as LocalEngine
    from ._local import TransactionHandle as TransactionHandle

__all__ = [
    "Client",
    "CompositionError",
    "ConfigurationError",
    "Hook",
    "LifecycleEvent",
    "LocalEngine",
    "OrchestratorError",
    "PermanentFailure",
    "Step",
    "StepConfig",
    "StepContext",
    "StepDeliveryError",
    "StepError",
    "StepInfo",
    "StepNotAwaitingError",
    "StepOutputError",
    "StepResponse",
    "StepState",
    "StepTimeoutError",
    "TransactionHandle",
    "TransactionNotFoundError",
    "TransactionState",
    "UnknownWorkflowError",
    "Workflow",
    "WorkflowData",
    "WorkflowFailedError",
    "WorkflowResponse",
    "WorkflowResult",
    "WorkflowTimeoutError",
    "connect",
    "create_hook",
    "create_step",
    "create_workflow",
    "parallelize",
    "transform",
    "when",
]

# The engines sit on the actor runtime, which imports this package's core modules: importing
# them lazily lets `import actors` come first.
_LAZY = {
    "Client": "._client",
    "LocalEngine": "._local",
    "TransactionHandle": "._local",
    "connect": "._client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
