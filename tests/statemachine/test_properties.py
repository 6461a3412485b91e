"""Property tests of the transaction state machine over random workflows.

The workflows are built with the real composer (chains, ``parallelize`` with chains inside
branches, ``when`` blocks, nested workflows with ``run_as_step``), with random retries, failures,
missing compensations and continue/skip flags; the driver delivers results in a random order,
with duplicates and stale answers, random timers, a workflow timeout and a cancel. The rules
checked are in :mod:`.oracle` (DESIGN.md section 3).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any

from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from orchestrator._composer import Workflow, create_workflow, parallelize, transform, when
from orchestrator._step import create_step

from .driver import COMP_OUTCOMES, INVOKE_OUTCOMES, Driver
from .oracle import check_run


# ------------------------------------------------------------------------------- specs
@dataclasses.dataclass
class StepSpec:
    name: str
    max_retries: int = 0
    compensate: bool = True
    cont: bool = False
    skip: bool | str = False
    interval: float | None = None


@dataclasses.dataclass
class ParSpec:
    branches: list[list[Any]]


@dataclasses.dataclass
class WhenSpec:
    flag: bool
    body: list[Any]


@dataclasses.dataclass
class SubSpec:
    wf: WfSpec
    max_retries: int = 0


@dataclasses.dataclass
class WfSpec:
    name: str
    body: list[Any]
    timeout: float | None = None


@dataclasses.dataclass
class _Ctx:
    names: itertools.count[int]
    wfs: itertools.count[int]
    budget: int
    steps: list[StepSpec] = dataclasses.field(default_factory=list)


def _seq(draw: Any, ctx: _Ctx, depth: int, wf_depth: int) -> list[Any]:
    n = draw(st.integers(1, 3)) if ctx.budget > 0 else 1
    return [_item(draw, ctx, depth, wf_depth) for _ in range(n)]


def _item(draw: Any, ctx: _Ctx, depth: int, wf_depth: int) -> Any:
    kinds = ["step", "step", "step"]
    if ctx.budget > 0 and depth < 2:
        kinds += ["par", "par", "when"]
        if wf_depth < 2:
            kinds.append("sub")
    kind = draw(st.sampled_from(kinds))
    if kind == "par":
        ctx.budget -= 1
        width = draw(st.integers(2, 3))
        return ParSpec([_seq(draw, ctx, depth + 1, wf_depth) for _ in range(width)])
    if kind == "when":
        ctx.budget -= 1
        return WhenSpec(draw(st.booleans()), _seq(draw, ctx, depth + 1, wf_depth))
    if kind == "sub":
        ctx.budget -= 1
        child = _workflow(draw, ctx, wf_depth + 1)
        return SubSpec(child, draw(st.sampled_from([0, 0, 1])))
    ctx.budget -= 1
    spec = StepSpec(
        name=f"s{next(ctx.names)}",
        max_retries=draw(st.integers(0, 2)),
        compensate=draw(st.sampled_from([True, True, True, False])),
        cont=draw(st.sampled_from([False] * 7 + [True])),
        skip=draw(st.sampled_from([False] * 7 + [True])),
        interval=draw(st.sampled_from([None, None, 0.5, 3.0])),
    )
    ctx.steps.append(spec)
    return spec


def _workflow(draw: Any, ctx: _Ctx, wf_depth: int) -> WfSpec:
    mine = len(ctx.steps)
    spec = WfSpec(f"wf{next(ctx.wfs)}", _seq(draw, ctx, 0, wf_depth))
    # only this workflow's own steps (those of nested ones were drawn in between, by name)
    own = [s for s in ctx.steps[mine:] if s.name in _names(spec.body)]
    for s in own:
        if s.skip is True and draw(st.booleans()):
            s.skip = draw(st.sampled_from([x.name for x in own]))
    spec.timeout = draw(st.sampled_from([None] * 5 + [4.0, 12.0]))
    return spec


def _names(items: list[Any]) -> set[str]:
    found: set[str] = set()
    for it in items:
        if isinstance(it, StepSpec):
            found.add(it.name)
        elif isinstance(it, ParSpec):
            for b in it.branches:
                found |= _names(b)
        elif isinstance(it, WhenSpec):
            found |= _names(it.body)
    return found


@dataclasses.dataclass
class Case:
    wf: WfSpec
    script: dict[str, list[str]]
    comp_script: dict[str, list[str]]
    custom: set[str]
    cancel_at: int | None
    cancel_abort: bool = False


_invoke_outcomes = st.sampled_from(["ok"] * 4 + list(INVOKE_OUTCOMES[1:]))
_comp_outcomes = st.sampled_from(["ok"] * 4 + list(COMP_OUTCOMES[1:]))


@st.composite
def cases(draw: Any) -> Case:
    ctx = _Ctx(itertools.count(1), itertools.count(1), budget=draw(st.integers(1, 10)))
    wf = _workflow(draw, ctx, 0)
    script: dict[str, list[str]] = {}
    comp_script: dict[str, list[str]] = {}
    custom: set[str] = set()
    for s in ctx.steps:
        script[s.name] = draw(st.lists(_invoke_outcomes, max_size=3))
        comp_script[s.name] = draw(st.lists(_comp_outcomes, max_size=3))
        if draw(st.booleans()):
            custom.add(s.name)
    cancel_at = draw(st.sampled_from([None] * 6 + [0, 1, 3, 8, 20, 10_000]))
    cancel_abort = cancel_at is not None and draw(st.booleans())
    return Case(wf, script, comp_script, custom, cancel_at, cancel_abort)


# ------------------------------------------------------------------------------ building
def _noop(data: Any, ctx: Any) -> Any:
    return data


def _keep(value: Any) -> Any:
    return value


def build(spec: WfSpec) -> Workflow:
    """The workflow that ``spec`` describes, composed with the real composer."""
    children = {id(item): build(item.wf) for item in _walk(spec.body) if isinstance(item, SubSpec)}

    def seq(items: list[Any], prev: Any, inp: Any) -> Any:
        for it in items:
            prev = one(it, prev, inp)
        return prev

    def one(it: Any, prev: Any, inp: Any) -> Any:
        if isinstance(it, StepSpec):
            options: dict[str, Any] = {"max_retries": it.max_retries}
            if it.cont:
                options["continue_on_permanent_failure"] = True
            if it.skip:
                options["skip_on_permanent_failure"] = it.skip
            if it.interval is not None:
                options.update(retry_interval=it.interval, max_retry_interval=4.0)
            step = create_step(it.name, _noop, _noop if it.compensate else None, **options)
            return step(prev)
        if isinstance(it, ParSpec):
            refs = parallelize(*(seq(b, prev, inp) for b in it.branches))
            return transform(list(refs), _keep)
        if isinstance(it, WhenSpec):
            flag = it.flag
            return when(inp, lambda _v: flag).then(lambda: seq(it.body, prev, inp))
        assert isinstance(it, SubSpec)
        ref = children[id(it)].run_as_step(prev)
        return ref.config(max_retries=it.max_retries) if it.max_retries else ref

    return create_workflow(spec.name, lambda inp: seq(spec.body, inp, inp), timeout=spec.timeout)


def _walk(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for it in items:
        out.append(it)
        if isinstance(it, ParSpec):
            for b in it.branches:
                out += _walk(b)
        elif isinstance(it, WhenSpec):
            out += _walk(it.body)
    return out


# --------------------------------------------------------------------------------- tests
# STATEMACHINE_EXAMPLES=5000 runs a longer hunt (the default keeps the folder fast)
_EXAMPLES = int(os.environ.get("STATEMACHINE_EXAMPLES", "200"))
_LARGE = [HealthCheck.data_too_large]
"""Random workflows with random interleavings are large inputs by nature; with some seeds most
of them exceed hypothesis's entropy budget, which fails the health check, not the property."""


def run_case(case: Case, rng: Any) -> Driver:
    """Build the case's workflow, run it through the driver, check the rules."""
    wf = build(case.wf)
    note(f"graph: {[(n.name, n.kind, n.after, n.blocks) for n in wf.graph.nodes]}")
    d = Driver(
        wf,
        case.script,
        case.comp_script,
        rng=rng,
        custom_comp=case.custom,
        cancel_at=case.cancel_at,
        cancel_abort=case.cancel_abort,
    )
    d.run({"n": 1})
    note(f"root trace: {d.trace()}")
    check_run(d)
    return d


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=_LARGE)
@given(case=cases(), rng=st.randoms(use_true_random=False))
def test_saga_rules_hold_for_random_workflows_and_interleavings(case: Case, rng: Any) -> None:
    d = run_case(case, rng)
    event(f"root ended {d.root.state.status}")
    event(f"nested transactions: {min(len(d.txs) - 1, 3)}")
    size = sum(len(t.graph.nodes) for t in d.txs.values())
    event(f"steps: {'1-3' if size <= 3 else '4-9' if size < 10 else '10+'}")
    event(f"events applied: {'<10' if len(d.log) < 10 else '<40' if len(d.log) < 40 else '40+'}")
    if any(c.action == "compensate" for c in d.invokes_of()):
        event("root compensated something")
    if any(a.kind != "normal" for a in d.log):
        event("duplicates or stale results delivered")


@settings(max_examples=max(60, _EXAMPLES // 3), deadline=None, suppress_health_check=_LARGE)
@given(case=cases())
def test_fifo_delivery_without_noise(case: Case) -> None:
    """The same rules with the deterministic driver (FIFO, timers when idle, no duplicates)."""
    wf = build(case.wf)
    d = Driver(wf, case.script, case.comp_script, custom_comp=case.custom)
    d.run({"n": 1})
    check_run(d)
