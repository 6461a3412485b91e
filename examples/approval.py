"""A long-running approval workflow: submit a change, wait for a human, then apply it.

``await-approval`` is an async step (``async_=True``) whose handler only files the request in
an inbox and returns ``None``: the run then returns with state ``invoking``, and the workflow
waits until someone answers with the step's idempotency key::

    await engine.set_step_success(
        f"approval:{transaction_id}:await-approval:invoke", {"approved": True, "by": "alice"}
    )

A rejection (``{"approved": False, ...}``) makes ``apply-change`` fail for good, and the
submitted request is withdrawn by its compensation: the run ends ``reverted``.

From the command line (the run stops at ``invoking``, and the local engine with it)::

    orchestrator run examples.approval:approval \\
        --input '{"change": {"feature": "dark-mode", "enabled": true}, "requested_by": "bob"}'
"""

from __future__ import annotations

import itertools
from typing import Any

import anyio
from rich.console import Console
from rich.text import Text

from orchestrator import (
    LocalEngine,
    StepContext,
    StepResponse,
    TransactionState,
    WorkflowData,
    create_step,
    create_workflow,
)
from orchestrator.cli import render_result

__all__ = ["ApprovalContainer", "approval", "demo", "make_container"]


class Requests:
    """Change requests, and the reviewers' inbox: request id -> the key that answers it."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.requests: dict[str, dict[str, Any]] = {}
        self.inbox: dict[str, str] = {}
        self._filed: dict[str, anyio.Event] = {}
        self._ids = itertools.count(1)

    def submit(self, change: dict[str, Any], requested_by: str) -> dict[str, Any]:
        request = {
            "id": f"req-{next(self._ids)}",
            "change": change,
            "requested_by": requested_by,
            "status": "submitted",
        }
        self.requests[request["id"]] = request
        self.journal.append(f"requests: {requested_by} submitted {request['id']}")
        return dict(request)

    def withdraw(self, request_id: str) -> None:
        self.requests[request_id]["status"] = "withdrawn"
        self.inbox.pop(request_id, None)
        self.journal.append(f"requests: withdrew {request_id}")

    def file(self, request_id: str, key: str) -> None:
        """Put a request in the reviewers' inbox, with the key that answers it."""
        self.inbox[request_id] = key
        self.journal.append(f"requests: {request_id} awaits review ({key})")
        self._filed.setdefault(key, anyio.Event()).set()

    async def wait_filed(self, key: str) -> None:
        """Wait until the request answered by ``key`` is in the inbox."""
        await self._filed.setdefault(key, anyio.Event()).wait()


class Settings:
    """The settings the changes apply to."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.values: dict[str, Any] = {}

    def apply(self, change: dict[str, Any]) -> dict[str, Any]:
        previous = {key: self.values.get(key) for key in change}
        self.values.update(change)
        self.journal.append(f"settings: applied {change}")
        return previous


class ApprovalContainer:
    """The services of the approval workflow, by name."""

    def __init__(self) -> None:
        self.journal: list[str] = []
        self.requests = Requests(self.journal)
        self.settings = Settings(self.journal)

    def resolve(self, name: str) -> Any:
        return {"requests": self.requests, "settings": self.settings}[name]


def make_container() -> ApprovalContainer:
    """Fresh services (the CLI calls this)."""
    return ApprovalContainer()


@create_step("submit-request")
def submit_request(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    requests: Requests = ctx.container.resolve("requests")
    return requests.submit(data["change"], data.get("requested_by") or "anonymous")


@submit_request.compensate
def withdraw_request(request: dict[str, Any] | None, ctx: StepContext) -> None:
    if request:
        ctx.container.resolve("requests").withdraw(request["id"])


@create_step("await-approval", async_=True)
async def await_approval(request: dict[str, Any], ctx: StepContext) -> None:
    """File the request for a reviewer; the answer comes later, with ``set_step_success``."""
    requests: Requests = ctx.container.resolve("requests")
    requests.file(request["id"], ctx.idempotency_key)


@create_step("apply-change")
def apply_change(data: dict[str, Any], ctx: StepContext) -> StepResponse[Any]:
    decision = data["decision"] or {}
    if not decision.get("approved"):
        StepResponse.permanent_failure(f"rejected by {decision.get('by', 'a reviewer')}")
    settings: Settings = ctx.container.resolve("settings")
    previous = settings.apply(data["request"]["change"])
    applied = {"change": data["request"]["change"], "approved_by": decision.get("by")}
    return StepResponse(applied, compensate_input=previous)


@apply_change.compensate
def revert_change(previous: dict[str, Any] | None, ctx: StepContext) -> None:
    if previous is not None:
        ctx.container.resolve("settings").apply(previous)


@create_workflow("approval")
def approval(input: WorkflowData) -> dict[str, Any]:
    """Submit a change request, wait for a reviewer's decision, apply the change."""
    request = submit_request(input)
    decision = await_approval(request)
    applied = apply_change({"request": request, "decision": decision})
    return {"request": request["id"], "decision": decision, "applied": applied}


async def _request_change(
    engine: LocalEngine,
    services: ApprovalContainer,
    console: Console,
    transaction_id: str,
    decision: dict[str, Any],
) -> tuple[TransactionState, bool, TransactionState]:
    started = await engine.run(
        approval,
        input={"change": {"dark-mode": True}, "requested_by": "bob"},
        transaction_id=transaction_id,
    )
    render_result(started, console, graph=approval.graph)
    key = f"approval:{transaction_id}:await-approval:invoke"
    # The run returns `invoking` as soon as only async steps are left, which may be before
    # await-approval's handler has filed the request: the reviewer waits for it to arrive.
    with anyio.fail_after(5):
        await services.requests.wait_filed(key)
    filed = key in services.requests.inbox.values()
    console.print(
        Text.assemble(("answering ", "bold"), key, (" with ", "bold"), str(decision)),
        soft_wrap=True,
    )
    final = await engine.set_step_success(key, decision)
    render_result(final, console)
    return started.state, filed, final.state


async def demo(console: Console) -> list[tuple[str, bool]]:
    """Run an approval that a reviewer accepts, and one that a reviewer rejects."""
    services = make_container()
    checks: list[tuple[str, bool]] = []
    async with LocalEngine(workflows=[approval], container=services) as engine:
        console.print(Text("A change request that alice approves", style="bold"))
        waiting, filed, final = await _request_change(
            engine, services, console, "change-42", {"approved": True, "by": "alice"}
        )
        checks.append(("change-42 waits for approval (invoking)", waiting == "invoking"))
        checks.append(("change-42's reviewer got the step's key", filed))
        checks.append(("change-42 is done once approved", final == TransactionState.DONE))
        checks.append(("the change is applied", services.settings.values == {"dark-mode": True}))

        console.print()
        console.print(Text("A change request that carol rejects", style="bold"))
        services.settings.values.clear()
        waiting, filed, final = await _request_change(
            engine, services, console, "change-43", {"approved": False, "by": "carol"}
        )
        checks.append(("change-43 waits for approval (invoking)", waiting == "invoking"))
        checks.append(("change-43's reviewer got the step's key", filed))
        checks.append(("change-43 is reverted once rejected", final == TransactionState.REVERTED))
        checks.append(
            (
                "the rejected request is withdrawn and nothing applied",
                services.requests.requests["req-2"]["status"] == "withdrawn"
                and not services.settings.values,
            )
        )
    for line in services.journal:
        console.print(Text(f"  {line}"), soft_wrap=True)
    return checks
