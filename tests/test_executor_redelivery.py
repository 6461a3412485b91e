"""A step command delivered again after its worker died: run it again only if its transaction
still waits for the answer (a step whose result is recorded never runs again)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from actors import MemoryStore, StepCommand, Subjects, encode_message
from orchestrator import StepContext, create_step, create_workflow
from orchestrator._codec import encode
from orchestrator._transaction import StepRecord, new_state
from orchestrator.services import Worker
from transport import MemoryTransport, WorkMsg

pytestmark = pytest.mark.anyio

ACK_WAIT = 0.2


async def test_a_redelivered_command_runs_only_while_its_attempt_is_outstanding() -> None:
    runs: list[str] = []
    second_ran = anyio.Event()

    async def handler(data: Any, ctx: StepContext) -> str:
        runs.append(ctx.transaction_id)
        if ctx.transaction_id == "t-open":
            second_ran.set()
        return "ok"

    step = create_step("r-step", handler)
    wf = create_workflow("r-flow", lambda inp: step(inp))
    subjects = Subjects("redeliver")
    store = MemoryStore()
    answered = new_state(wf.graph, "t-answered")
    answered.status = "invoking"
    answered.steps["r-step"] = StepRecord(state="done", attempt=1)  # its result is recorded
    await store.save(answered)
    waiting = new_state(wf.graph, "t-open")
    waiting.status = "invoking"
    waiting.steps["r-step"] = StepRecord(state="invoking", attempt=1, running=True)
    await store.save(waiting)

    def command(tx: str) -> bytes:
        return encode_message(
            StepCommand(
                workflow="r-flow",
                transaction_id=tx,
                step="r-step",
                action="invoke",
                attempt=1,
                input=encode(None),
                reply_subject=subjects.tx(tx),
            )
        )

    async with MemoryTransport() as transport:
        await transport.ensure_queue(subjects.work_queue_config(ack_wait=ACK_WAIT))
        durable = f"step-{subjects.step('r-step').rsplit('.', 1)[1]}"
        # A worker that takes the command, records the result (the store above) and dies
        # before it acks.
        taken: list[WorkMsg] = []
        got_it = anyio.Event()

        def dying_worker(work: WorkMsg) -> None:
            taken.append(work)
            got_it.set()

        dead = await transport.consume(
            subjects.work_queue, durable, subjects.step("r-step"), dying_worker, max_in_flight=1
        )
        await transport.enqueue(subjects.step("r-step"), command("t-answered"))
        with anyio.fail_after(5):
            await got_it.wait()
        await dead.stop()
        await taken[0].nak()  # handed back (as ack_wait running out would, only sooner)
        # A command whose attempt is still outstanding: it comes after the redelivery.
        await transport.enqueue(subjects.step("r-step"), command("t-open"))

        async with Worker(
            [wf], transport=transport, prefix="redeliver", store=store, ack_wait=ACK_WAIT
        ):
            with anyio.fail_after(10):
                await second_ran.wait()

    assert taken[0].num_delivered == 1
    assert runs == ["t-open"]  # the answered command was dropped, not run again
