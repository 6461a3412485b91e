"""Throughput and latency of the four workloads of ../shared/peers/medusa, on LocalEngine.

    python benchmarks/bench.py                 # all cases, one JSON line each
    python benchmarks/bench.py --cases a,c     # some of them
    python benchmarks/bench.py --mode nats     # services in their own processes, over NATS

Same shapes, counts, warm-up and percentile rule as Medusa's ``bench.mjs``:
(a) linear 3-step workflow, N=2000, one at a time; (b) the same, 50 in flight; (c) a 10-way
``parallelize`` fan-out, N=500, one at a time; (d) a 3-step workflow whose 3rd step fails, so 2
compensations run, N=1000, one at a time. Steps are trivial async functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from orchestrator import (
    LocalEngine,
    StepResponse,
    WorkflowResponse,
    create_step,
    create_workflow,
    parallelize,
)
from orchestrator.services import loop_options

WARMUP = 500


async def _inc(input: dict[str, Any], ctx: Any) -> StepResponse[dict[str, int]]:
    return StepResponse({"i": input["i"] + 1})


async def _noop(input: Any, ctx: Any) -> None:
    return None


s1 = create_step("b-s1", _inc, _noop)
s2 = create_step("b-s2", _inc, _noop)
s3 = create_step("b-s3", _inc, _noop)


@create_workflow("bench-linear3")
def linear(input: Any) -> WorkflowResponse:
    return WorkflowResponse(s3(s2(s1(input))))


def _fan_step(k: int) -> Any:
    async def fan(input: dict[str, Any], ctx: Any) -> StepResponse[dict[str, int]]:
        return StepResponse({"k": k, "i": input["i"]})

    return create_step(f"b-fan-{k}", fan, _noop)


fan_steps = [_fan_step(k) for k in range(10)]


@create_workflow("bench-fanout10")
def fanout(input: Any) -> WorkflowResponse:
    return WorkflowResponse(list(parallelize(*(s(input) for s in fan_steps))))


compensations = 0


async def _count(input: Any, ctx: Any) -> None:
    global compensations
    compensations += 1


async def _boom(input: Any, ctx: Any) -> None:
    raise RuntimeError("boom")


f1 = create_step("b-f1", _inc, _count)
f2 = create_step("b-f2", _inc, _count)
f3 = create_step("b-f3", _boom)  # no compensation: exactly 2 compensations run


@create_workflow("bench-fail3")
def failing(input: Any) -> WorkflowResponse:
    return WorkflowResponse(f3(f2(f1(input))))


WORKFLOWS = [linear, fanout, failing]


def _ok_linear(r: Any, i: int) -> None:
    if r.state.value != "done" or r.result["i"] != i + 3:
        raise AssertionError(f"bad linear result {r.result!r}")


def _ok_fan(r: Any, i: int) -> None:
    if r.state.value != "done" or len(r.result) != 10:
        raise AssertionError("bad fanout result")


def _ok_fail(r: Any, i: int) -> None:
    if r.state.value != "reverted":
        raise AssertionError(f"bad fail state {r.state}")


def _case(id: str, label: str, wf: Any, n: int, c: int, check: Any) -> dict[str, Any]:
    return {"id": id, "label": label, "wf": wf, "n": n, "c": c, "check": check}


CASES = [
    _case("a", "linear3 sequential", linear, 2000, 1, _ok_linear),
    _case("b", "linear3 concurrency=50", linear, 2000, 50, _ok_linear),
    _case("c", "fanout10 parallelize sequential", fanout, 500, 1, _ok_fan),
    _case("d", "fail@3 + 2 compensations sequential", failing, 1000, 1, _ok_fail),
]


def pct(values: list[float], p: float) -> float:
    """Medusa's rule: the ceil(p% * n)-th smallest value."""
    idx = min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))
    return values[idx]


async def measure(
    run: Callable[[int], Awaitable[Any]],
    n: int,
    concurrency: int,
    check: Callable[[Any, int], None],
) -> dict[str, Any]:
    lat = [0.0] * n
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            s = time.perf_counter()
            r = await run(i)
            lat[i] = (time.perf_counter() - s) * 1000
            check(r, i)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    total = (time.perf_counter() - t0) * 1000
    lat.sort()
    return {
        "n": n,
        "concurrency": concurrency,
        "total_ms": round(total, 1),
        "wf_per_sec": round(n / total * 1000, 1),
        "p50_ms": round(pct(lat, 50), 3),
        "p99_ms": round(pct(lat, 99), 3),
        "max_ms": round(lat[-1], 3),
    }


async def bench_local(cases: list[dict[str, Any]]) -> None:
    global compensations
    async with LocalEngine(WORKFLOWS) as engine:
        for case in cases:
            wf = case["wf"]

            async def run(i: int, wf: Any = wf) -> Any:
                return await engine.run(wf, {"i": i}, throw_on_error=False)

            await measure(run, min(WARMUP, case["n"]), case["c"], case["check"])
            compensations = 0
            m = await measure(run, case["n"], case["c"], case["check"])
            if case["id"] == "d" and compensations != 2 * case["n"]:
                raise AssertionError(f"expected {2 * case['n']} compensations, got {compensations}")
            print(json.dumps({"mode": "local", "case": case["id"], "label": case["label"], **m}))
            sys.stdout.flush()


NATS_CONFIGS = {
    "default": None,
    "always": "jetstream {\n  sync_interval: always\n}\n",
}


async def serve(role: str, url: str, prefix: str) -> None:
    """Run a coordinator or a worker for the NATS benchmark until terminated."""
    import structlog

    from orchestrator.services import Coordinator, Worker
    from transport import NatsTransport

    # stdout carries only "ready" to the parent; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    async with NatsTransport(url, name=f"bench-{role}") as transport:
        service: Any
        if role == "coordinator":
            service = Coordinator(WORKFLOWS, transport=transport, prefix=prefix)
        else:
            service = Worker(WORKFLOWS, transport=transport, prefix=prefix)
        async with service:
            print("ready", flush=True)
            await anyio.sleep_forever()


async def bench_nats(
    cases: list[dict[str, Any]], sync: str, concurrency: list[int], server_procs: int
) -> None:
    """Cases (a)-(d) through a client, with a coordinator and a worker in their own processes
    on a local nats-server with file storage."""
    from anyio.abc import Process
    from anyio.streams.text import TextReceiveStream

    from orchestrator import connect
    from transport import NatsServer

    # The server shares the machine with the client, the coordinator and the worker: on one OS
    # thread (GOMAXPROCS=1) its goroutines hand messages over without waking other threads.
    env = {"GOMAXPROCS": str(server_procs)} if server_procs else None
    with NatsServer(config=NATS_CONFIGS[sync], env=env) as server:
        prefix = "bench"
        procs: list[Process] = []
        try:
            for role in ("coordinator", "worker"):
                command = [sys.executable, __file__, "--serve", role, "--url", server.url]
                proc = await anyio.open_process([*command, "--prefix", prefix])
                procs.append(proc)
                assert proc.stdout is not None
                with anyio.fail_after(30):  # it says "ready" once it consumes
                    async for text in TextReceiveStream(proc.stdout):
                        if "ready" in text:
                            break
            async with connect(server.url, prefix=prefix) as client:
                for case in cases:
                    for c in concurrency:
                        wf = case["wf"]

                        async def run(i: int, wf: Any = wf) -> Any:
                            return await client.run(wf, {"i": i}, throw_on_error=False)

                        n = min(case["n"], 1000 if c > 1 else 500)
                        await measure(run, min(100, n), c, case["check"])
                        m = await measure(run, n, c, case["check"])
                        line = {"mode": "nats", "sync": sync, "case": case["id"]}
                        print(json.dumps({**line, "label": case["label"], **m}), flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            with anyio.fail_after(10):
                for proc in procs:
                    await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="local", choices=["local", "nats"])
    parser.add_argument("--cases", default="a,b,c,d", help="comma-separated case ids")
    parser.add_argument(
        "--sync", default="both", choices=["default", "always", "both"], help="nats mode"
    )
    parser.add_argument("--concurrency", default="1,64", help="nats mode: runs in flight")
    parser.add_argument(
        "--server-procs",
        type=int,
        default=1,
        help="nats mode: GOMAXPROCS of the nats-server (0: Go's default, one per core)",
    )
    parser.add_argument("--serve", choices=["coordinator", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        anyio.run(serve, args.serve, args.url, args.prefix, backend_options=loop_options())
        return
    wanted = set(args.cases.split(","))
    cases = [c for c in CASES if c["id"] in wanted]
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# python {platform.python_version()} | {platform.system().lower()}/{platform.machine()}"
        f" | {os.cpu_count()} cpu | loadavg(1/5/15m) {load}"
    )
    if args.mode == "local":
        anyio.run(bench_local, cases)
        return
    if "b" in wanted:  # (b) is (a) at 50 in flight: the nats mode varies concurrency itself
        cases = [c for c in cases if c["id"] != "b"]
    syncs = ["default", "always"] if args.sync == "both" else [args.sync]
    levels = [int(x) for x in args.concurrency.split(",")]
    for sync in syncs:  # the client runs on the services' loop too (see loop_options)
        anyio.run(
            bench_nats, cases, sync, levels, args.server_procs, backend_options=loop_options()
        )


if __name__ == "__main__":
    main()
