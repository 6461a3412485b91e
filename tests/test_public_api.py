"""The public names are a contract (DESIGN.md section 2): changing them must be deliberate."""

from __future__ import annotations

import subprocess
import sys

import orchestrator

EXPECTED = {
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
}


def test_exported_names_are_pinned() -> None:
    assert set(orchestrator.__all__) == EXPECTED


def test_every_exported_name_resolves() -> None:
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None


def test_errors_share_one_root() -> None:
    for name in orchestrator.__all__:
        obj = getattr(orchestrator, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, orchestrator.OrchestratorError), name
    assert issubclass(orchestrator.ConfigurationError, ValueError)


def test_actors_can_be_imported_first() -> None:
    # orchestrator's engines import actors, which import orchestrator's core: no cycle at import.
    code = "import actors, transport, orchestrator; print(orchestrator.LocalEngine.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LocalEngine"
