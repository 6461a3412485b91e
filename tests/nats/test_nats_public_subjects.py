"""The public subjects, driven by plain nats-py (no SDK code on the client side).

A coordinator and a worker run in this process over NATS; the test talks to them the way a
program in any language would: JSON on ``<prefix>.start.<workflow>`` and ``<prefix>.api.*``,
events on ``<prefix>.evt.<workflow>.<transaction>``, hook payloads on
``<prefix>.hook.<workflow>.<hook>``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats
import pytest
from nats.js.api import StorageType

from orchestrator import WorkflowResponse, create_hook, create_step, create_workflow
from orchestrator.services import DEFAULT_EVENT_LOG_BYTES, Coordinator, Worker
from transport import NatsTransport

pytestmark = pytest.mark.anyio

_prefixes = itertools.count(1)


async def _reserve(data: dict[str, Any]) -> dict[str, Any]:
    return {"reserved": data["items"]}


async def _charge(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("card") == "declined":
        raise RuntimeError("card declined")
    return {"charged": data["total"]}


reserve = create_step("pub-reserve", _reserve)
charge = create_step("pub-charge", _charge)


@create_workflow("pub-order")
def order(input: Any) -> Any:
    r = reserve(input)
    placed = create_hook("placed", {"items": r["reserved"], "total": input.total})
    c = charge(input)
    return WorkflowResponse({"reservation": r, "payment": c}, hooks=[placed])


@contextlib.asynccontextmanager
async def services(url: str, **coordinator_options: Any) -> AsyncIterator[str]:
    prefix = f"pub{next(_prefixes)}"
    async with (
        NatsTransport(url) as ct,
        NatsTransport(url) as wt,
        Coordinator([order], transport=ct, prefix=prefix, **coordinator_options),
        Worker([order], transport=wt, prefix=prefix),
    ):
        yield prefix


class Inbox:
    """Messages of a plain nats-py subscription, awaited with deadlines."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self._changed = anyio.Event()

    async def handler(self, msg: Any) -> None:
        self.items.append((msg.subject, json.loads(msg.data)))
        self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[tuple[str, Any]]:
        with anyio.fail_after(timeout):
            while not predicate(self.items):
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.items


def _finished(tx: str) -> Any:
    return lambda items: any(
        body.get("type") == "finish" and body.get("transaction_id") == tx for _, body in items
    )


async def test_a_json_start_runs_and_its_events_carry_the_result(nats_server: Any) -> None:
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            events = Inbox()
            await nc.subscribe(f"{prefix}.evt.pub-order.o-1", cb=events.handler)
            js = nc.jetstream()
            body = {"transaction_id": "o-1", "input": {"items": ["a", "b"], "total": 30}}
            await js.publish(
                f"{prefix}.start.pub-order",
                json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Nats-Msg-Id": "o-1"},
            )
            items = await events.wait_for(_finished("o-1"))
        finally:
            await nc.close()
    kinds = [body["type"] for _, body in items]
    assert kinds[0] == "begin"
    finish = items[-1][1]
    assert finish["type"] == "finish"
    assert finish["state"] == "done"
    assert finish["result"] == {"reservation": {"reserved": ["a", "b"]}, "payment": {"charged": 30}}


async def test_a_start_of_a_finished_transaction_answers_with_its_finish(nats_server: Any) -> None:
    # The second start carries no message id (so the stream does not drop it): it reaches the
    # coordinator, which runs nothing again and repeats the outcome for whoever waits.
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            events = Inbox()
            await nc.subscribe(f"{prefix}.evt.pub-order.o-again", cb=events.handler)
            body = json.dumps({"transaction_id": "o-again", "input": {"items": [], "total": 5}})
            await nc.publish(f"{prefix}.start.pub-order", body.encode())
            first = list(await events.wait_for(_finished("o-again")))
            await nc.publish(f"{prefix}.start.pub-order", body.encode())
            items = await events.wait_for(
                lambda items: sum(b.get("type") == "finish" for _, b in items) == 2
            )
        finally:
            await nc.close()
    again = items[len(first) :]
    assert [body["type"] for _, body in again] == ["finish"]  # no begin: nothing ran again
    assert (
        again[0][1]["result"]
        == first[-1][1]["result"]
        == {
            "reservation": {"reserved": []},
            "payment": {"charged": 5},
        }
    )
    assert again[0][1]["summary"]["transaction_id"] == "o-again"


async def test_a_plain_publish_without_headers_starts_too(nats_server: Any) -> None:
    # Core NATS publish, no JetStream API, no headers: the stream still captures it.
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            events = Inbox()
            await nc.subscribe(f"{prefix}.evt.pub-order.o-2", cb=events.handler)
            body = {"transaction_id": "o-2", "input": {"items": [], "total": 1}}
            await nc.publish(f"{prefix}.start.pub-order", json.dumps(body).encode())
            items = await events.wait_for(_finished("o-2"))
        finally:
            await nc.close()
    assert items[-1][1]["state"] == "done"


async def test_api_start_replies_with_the_transaction_id(nats_server: Any) -> None:
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            request = {"workflow": "pub-order", "input": {"items": ["x"], "total": 5}}
            reply = await nc.request(
                f"{prefix}.api.start",
                json.dumps(request).encode(),
                timeout=5,
                headers={"Content-Type": "application/json"},
            )
            answer = json.loads(reply.data)
            assert answer["ok"] is True
            tx = answer["transaction_id"]
            events = Inbox()
            await nc.subscribe(f"{prefix}.evt.pub-order.{tx}", cb=events.handler)
            with anyio.fail_after(10):
                while True:  # the run may have finished before the subscription: ask for it
                    got = await nc.request(
                        f"{prefix}.api.get",
                        json.dumps({"transaction_id": tx}).encode(),
                        timeout=5,
                        headers={"Content-Type": "application/json"},
                    )
                    state = json.loads(got.data)
                    if state["ok"] and state["result"]["state"] == "done":
                        break
                    await events.wait_for(lambda items: bool(items), timeout=10)
        finally:
            await nc.close()
    assert state["result"]["result"]["payment"] == {"charged": 5}
    assert [s["name"] for s in state["result"]["steps"]] == ["pub-reserve", "placed", "pub-charge"]


async def _api(nc: Any, subject: str, request: dict[str, Any], timeout: float = 10) -> Any:
    reply = await nc.request(
        subject,
        json.dumps(request).encode(),
        timeout=timeout,
        headers={"Content-Type": "application/json"},
    )
    return json.loads(reply.data)


async def test_api_start_with_wait_replies_with_the_outcome(nats_server: Any) -> None:
    # One request, one answer with the result: no subscription, no second request.
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            start = f"{prefix}.api.start"
            good = {"workflow": "pub-order", "input": {"items": ["x"], "total": 5}, "wait": 5}
            done = await _api(nc, start, good)
            declined = {**good, "input": {"items": ["y"], "total": 7, "card": "declined"}}
            reverted = await _api(nc, start, {**declined, "transaction_id": "pub-declined"})
            # A start of an id that exists only attaches: the answer says so, without a result
            # (the caller asks `get`, as for any duplicate).
            again = await _api(nc, start, {**declined, "transaction_id": "pub-declined"})
            bad_wait = await _api(nc, start, {**good, "wait": -1})
        finally:
            await nc.close()
    assert done["ok"] is True
    assert done["state"] == "done"
    assert done["result"]["transaction_id"] == done["transaction_id"]
    assert done["result"]["result"]["payment"] == {"charged": 5}
    assert [s["name"] for s in done["result"]["steps"]] == ["pub-reserve", "placed", "pub-charge"]
    assert reverted["transaction_id"] == "pub-declined"
    assert reverted["state"] == reverted["result"]["state"] == "reverted"
    assert again == {"ok": True, "transaction_id": "pub-declined", "duplicate": True}
    assert bad_wait["ok"] is False
    assert bad_wait["error_type"] == "ProtocolError"
    assert "wait must be" in bad_wait["error"]


async def test_api_start_with_wait_answers_without_a_result_when_it_runs_longer(
    nats_server: Any,
) -> None:
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            request = {"workflow": "pub-order", "input": {"items": ["x"], "total": 5}, "wait": 0}
            answer = await _api(nc, f"{prefix}.api.start", request)
            tx = answer["transaction_id"]
            with anyio.fail_after(10):
                while True:  # it runs on: its state says when it is over
                    got = await _api(nc, f"{prefix}.api.get", {"transaction_id": tx})
                    if got["result"]["state"] == "done":
                        break
        finally:
            await nc.close()
    assert "result" not in answer
    assert got["result"]["result"]["payment"] == {"charged": 5}


async def test_hook_payloads_reach_plain_subscribers(nats_server: Any) -> None:
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            hooks = Inbox()
            events = Inbox()
            await nc.subscribe(f"{prefix}.hook.pub-order.placed", cb=hooks.handler)
            await nc.subscribe(f"{prefix}.evt.pub-order.o-3", cb=events.handler)
            body = {"transaction_id": "o-3", "input": {"items": ["k"], "total": 9}}
            await nc.publish(f"{prefix}.start.pub-order", json.dumps(body).encode())
            items = await hooks.wait_for(lambda items: bool(items))
            await events.wait_for(_finished("o-3"))
        finally:
            await nc.close()
    assert items == [(f"{prefix}.hook.pub-order.placed", {"items": ["k"], "total": 9})]


BAD_STARTS = [
    pytest.param(b"\xc1\x00\x13garbage", "not valid msgpack", id="undecodable"),
    pytest.param(b'{"transaction_id": "b-1", "input": ', "not valid JSON", id="invalid-json"),
    pytest.param(b'{"transaction_id": "b-2", "inputs": {}}', "unknown field", id="wrong-schema"),
]


@pytest.mark.parametrize(("payload", "complaint"), BAD_STARTS)
async def test_bad_start_messages_get_an_error_event_and_are_not_redelivered(
    nats_server: Any, payload: bytes, complaint: str
) -> None:
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            events = Inbox()
            await nc.subscribe(f"{prefix}.evt.>", cb=events.handler)
            await nc.publish(f"{prefix}.start.pub-order", payload)
            good = {"transaction_id": "good-1", "input": {"items": [], "total": 2}}
            await nc.publish(f"{prefix}.start.pub-order", json.dumps(good).encode())
            items = await events.wait_for(
                lambda items: (
                    _finished("good-1")(items)
                    and any(body.get("type") == "error" for _, body in items)
                )
            )
            js = nc.jetstream()
            with anyio.fail_after(10):  # the bad message leaves the work queue for good
                while (await js.stream_info(f"{prefix.upper()}_WORK")).state.messages:  # noqa: ASYNC110 - stream state has no event
                    await anyio.sleep(0.05)
        finally:
            await nc.close()
    errors = [body for _, body in items if body.get("type") == "error"]
    assert len(errors) == 1
    assert complaint in errors[0]["error"]["message"]


async def test_unknown_workflow_and_oversized_start(nats_server: Any) -> None:
    async with services(nats_server.url, max_payload=2000) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            events = Inbox()
            await nc.subscribe(f"{prefix}.evt.>", cb=events.handler)
            await nc.publish(
                f"{prefix}.start.no-such-flow", json.dumps({"transaction_id": "u-1"}).encode()
            )
            big = {"transaction_id": "big-1", "input": {"blob": "x" * 5000}}
            await nc.publish(f"{prefix}.start.pub-order", json.dumps(big).encode())
            good = {"transaction_id": "good-2", "input": {"items": [], "total": 2}}
            await nc.publish(f"{prefix}.start.pub-order", json.dumps(good).encode())
            items = await events.wait_for(
                lambda items: (
                    _finished("good-2")(items)
                    and sum(body.get("type") == "error" for _, body in items) == 2
                )
            )
            reply = await nc.request(
                f"{prefix}.api.start",
                b"\x00not json",
                timeout=5,
                headers={"Content-Type": "application/json"},
            )
        finally:
            await nc.close()
    errors = {
        body["transaction_id"]: body["error"]["message"]
        for _, body in items
        if body.get("type") == "error"
    }
    assert "unknown workflow 'no-such-flow'" in errors["u-1"]
    assert "the limit is 2000" in errors["big-1"]
    answer = json.loads(reply.data)
    assert answer["ok"] is False
    assert "not valid JSON" in answer["error"]


async def test_events_and_hook_payloads_are_kept_in_their_streams(nats_server: Any) -> None:
    async with services(nats_server.url) as prefix:
        nc = await nats.connect(nats_server.url)
        try:
            events = Inbox()
            await nc.subscribe(f"{prefix}.evt.pub-order.kept-1", cb=events.handler)
            body = {"transaction_id": "kept-1", "input": {"items": ["z"], "total": 3}}
            await nc.publish(f"{prefix}.start.pub-order", json.dumps(body).encode())
            items = await events.wait_for(_finished("kept-1"))
            js = nc.jetstream()
            # a subscriber that comes later can read them back from the streams
            stored = await js.get_last_msg(
                f"{prefix.upper()}_EVENTS", f"{prefix}.evt.pub-order.kept-1"
            )
            hook = await js.get_last_msg(
                f"{prefix.upper()}_HOOKS", f"{prefix}.hook.pub-order.placed"
            )
            event_log = (await js.stream_info(f"{prefix.upper()}_EVENTS")).config
            hook_log = (await js.stream_info(f"{prefix.upper()}_HOOKS")).config
        finally:
            await nc.close()
    assert json.loads(stored.data) == items[-1][1]
    assert json.loads(hook.data) == {"items": ["z"], "total": 3}
    # Events, sent at most once, are kept in memory, bounded; hook payloads on disk.
    assert event_log.storage == StorageType.MEMORY
    assert event_log.max_bytes == DEFAULT_EVENT_LOG_BYTES
    assert hook_log.storage == StorageType.FILE
