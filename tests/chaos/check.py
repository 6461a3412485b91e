"""The model of a chaos run and the checks of its outcome.

A :class:`Plan` per transaction says which steps fail for good, which flake and which
compensations flake; :func:`predict` says what must happen; :func:`check_run` compares the
ledger (what the step handlers did) and the final states (what the coordinators say) with it,
and returns a :class:`Report` with the figures of the run. :func:`check_resources` checks the
streams and buckets the run left behind (:class:`Resources`, collected by the harness once the
services have settled): nothing grows without bound.

A nested transaction (``chaos-nest`` runs ``chaos-sub`` as a step) is checked on its own, as
its ledger rows carry its own transaction id, and with its parent (:func:`units_of`).
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors._kvstore import kv_key
from orchestrator import WorkflowResult

from .app import MAX_RETRIES, WORKFLOWS, layers_of, plan_steps, step_output, workflow_of

FINAL_STATES = ("done", "reverted", "failed")

# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one transaction's steps do (part of its input and context)."""

    workflow: str
    seed: str
    fail: dict[str, str] = field(default_factory=dict)
    flaky: dict[str, int] = field(default_factory=dict)
    comp_flaky: tuple[str, ...] = ()

    def input(self) -> dict[str, Any]:
        return {"seed": self.seed, "plan": {"fail": self.fail, "flaky": self.flaky}}

    def context(self) -> dict[str, Any]:
        return {"comp_flaky": list(self.comp_flaky)}


def make_plan(
    rng: random.Random,
    seed: str,
    *,
    p_fail: float = 0.2,
    p_flaky: float = 0.15,
    p_comp_flaky: float = 0.05,
) -> Plan:
    """A random plan: each step fails for good with ``p_fail`` (half of those at once, half
    after spending its retries), else flakes with ``p_flaky``; each compensation fails on its
    first attempt with ``p_comp_flaky``. The steps of a nested workflow are planned with their
    parent's (the child reads the parent's plan)."""
    workflow = rng.choice(sorted(WORKFLOWS))
    fail: dict[str, str] = {}
    flaky: dict[str, int] = {}
    comp_flaky: list[str] = []
    for step in plan_steps(workflow):
        if rng.random() < p_fail:
            fail[step] = rng.choice(["permanent", "exhaust"])
        elif rng.random() < p_flaky:
            flaky[step] = rng.randint(1, MAX_RETRIES)
        if rng.random() < p_comp_flaky:
            comp_flaky.append(step)
    return Plan(workflow, seed, fail, flaky, tuple(comp_flaky))


@dataclass(frozen=True)
class Prediction:
    state: str
    """``done`` or ``reverted`` (compensations always recover: they flake once at most)."""
    invoked: frozenset[str]
    """The nodes (steps and nested steps) that run (and, when reverted, are compensated; a
    nested step whose child reverted by itself needs no compensation)."""
    fail_level: int | None
    """The layer where the first failure for good happens."""
    outputs: dict[str, Any]
    """What each node returns when it succeeds (a nested step: its child's result)."""
    result: dict[str, Any] | None
    """The workflow's result when done."""
    failing: frozenset[str] = frozenset()
    """The nodes of ``fail_level`` that fail for good (a nested step: its child reverted)."""
    cause: str | None = None
    """Why it reverts: ``self`` (one of its steps failed for good) or ``parent`` (a nested
    transaction that ended done, compensated by its parent because a later step failed)."""
    children: dict[str, list[tuple[str, Prediction]]] = field(default_factory=dict)
    """Nested step -> the child transactions it runs (id and prediction), in attempt order."""


def child_id(tx: str, step: str, attempt: int) -> str:
    """The transaction id of the nested transaction that ``attempt`` of ``step`` runs."""
    return f"{tx}:{step}" if attempt == 1 else f"{tx}:{step}:attempt-{attempt}"


def flat(values: list[Any]) -> list[Any]:
    """As the app's steps see the outputs before them (a child's result: every output in it)."""
    out: list[Any] = []
    for v in values:
        out.extend(flat([v[k] for k in sorted(v)]) if isinstance(v, dict) else [v])
    return out


def predict(plan: Plan, tx: str | None = None) -> Prediction:
    """What transaction ``tx`` (default: the plan's seed, the harness's id) of ``plan`` does,
    with its nested transactions (``children``)."""
    return _predict(plan.workflow, plan, tx or plan.seed, [])


def _predict(workflow: str, plan: Plan, tx: str, inherited: list[Any]) -> Prediction:
    layers = layers_of(workflow)
    graph = {n.name: n for n in workflow_of(workflow).graph.nodes}
    outputs: dict[str, Any] = {}
    own: dict[str, Prediction] = {}
    handed: dict[str, list[Any]] = {}
    failing: set[str] = set()
    for layer in layers:
        for name in layer:
            node = graph[name]
            prev = flat([outputs[a] for a in node.after]) if node.after else list(inherited)
            if node.kind == "subflow":
                if len(layer) > 1:
                    raise ValueError(f"{name}: the model knows nested steps alone in a layer")
                assert node.workflow is not None
                child = _predict(node.workflow, plan, child_id(tx, name, 1), prev)
                own[name], handed[name] = child, prev
                outputs[name] = dict(child.outputs)
                if child.state == "reverted":
                    failing.add(name)
            else:
                outputs[name] = step_output(name, plan.seed, [p for p in prev if p is not None])
                if name in plan.fail:
                    failing.add(name)
    levels = [i for i, layer in enumerate(layers) if failing & set(layer)]
    level = levels[0] if levels else None
    invoked = frozenset(
        s for layer in (layers if level is None else layers[: level + 1]) for s in layer
    )
    state = "done" if level is None else "reverted"
    children: dict[str, list[tuple[str, Prediction]]] = {}
    for name in sorted(invoked & set(own)):
        child = own[name]
        if child.state == "reverted":  # it undoes itself, and runs again while retries last
            child_workflow = graph[name].workflow
            assert child_workflow is not None
            ids = [child_id(tx, name, n) for n in range(1, 2 + graph[name].config.max_retries)]
            children[name] = [(i, _predict(child_workflow, plan, i, handed[name])) for i in ids]
        elif state == "reverted":  # done, then compensated by this transaction
            children[name] = [(child_id(tx, name, 1), _undone(child))]
        else:
            children[name] = [(child_id(tx, name, 1), child)]
    if level is None:
        return Prediction("done", invoked, None, outputs, dict(outputs), children=children)
    at_level = frozenset(failing & set(layers[level]))
    return Prediction(
        "reverted", invoked, level, outputs, None, at_level, cause="self", children=children
    )


def _undone(done: Prediction) -> Prediction:
    """A transaction that ended done, then compensated by its parent (its children too)."""
    children = {
        step: [(i, _undone(p) if p.state == "done" else p) for i, p in runs]
        for step, runs in done.children.items()
    }
    return Prediction(
        "reverted", done.invoked, None, done.outputs, None, cause="parent", children=children
    )


def successors(workflow: str) -> dict[str, set[str]]:
    """Node -> every node after it (transitively), from the graph's ``after`` lists."""
    nodes = workflow_of(workflow).graph.nodes
    direct: dict[str, set[str]] = defaultdict(set)
    for node in nodes:
        for before in node.after:
            direct[before].add(node.name)
    closure: dict[str, set[str]] = {}
    for node in reversed(nodes):
        after: set[str] = set()
        for nxt in direct[node.name]:
            after |= {nxt} | closure.get(nxt, set())
        closure[node.name] = after
    return closure


# --- the ledger -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    tx: str
    step: str
    action: str
    attempt: int
    started: float
    ended: float | None
    outcome: str | None
    payload: Any
    deliveries: int


@dataclass(frozen=True)
class Delivery:
    tx: str
    step: str
    action: str
    attempt: int
    pid: int
    started: float
    ended: float | None
    outcome: str | None


@dataclass
class LedgerData:
    attempts: dict[str, list[Attempt]]
    deliveries: dict[str, list[Delivery]]


def read_ledger(path: Path) -> LedgerData:
    attempts: dict[str, list[Attempt]] = defaultdict(list)
    deliveries: dict[str, list[Delivery]] = defaultdict(list)
    with sqlite3.connect(path, timeout=60) as db:
        for tx, step, action, attempt, started, ended, outcome, payload, count in db.execute(
            "select tx, step, action, attempt, started, ended, outcome, payload, deliveries "
            "from attempts order by started"
        ):
            decoded = None if payload is None else json.loads(payload)
            attempts[tx].append(
                Attempt(tx, step, action, attempt, started, ended, outcome, decoded, count)
            )
        for row in db.execute(
            "select tx, step, action, attempt, pid, started, ended, outcome "
            "from deliveries order by started"
        ):
            deliveries[row[0]].append(Delivery(*row))
    return LedgerData(dict(attempts), dict(deliveries))


# --- the checks -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    checked: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    unit: str = "transactions"
    """What ``checked`` counts (failures are keyed by one of them)."""

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, tx: str, message: str) -> None:
        self.failures.setdefault(tx, message)


@dataclass
class Report:
    figures: dict[str, Any]
    checks: list[Check]
    examples: dict[str, str] = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)
    """Further titled blocks of lines (the resource sizes), printed after the figures."""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def render(self, examples: int = 2) -> str:
        lines = ["chaos run:"]
        width = max(len(k) for k in self.figures)
        lines += [f"  {k:<{width}}  {v}" for k, v in self.figures.items()]
        for title, block in self.sections.items():
            lines.append(f"{title}:")
            lines.extend(f"  {line}" for line in block)
        lines.append("checks:")
        for check in self.checks:
            verdict = "ok" if check.ok else f"FAILED for {len(check.failures)}"
            unit = check.unit.removesuffix("s") if check.checked == 1 else check.unit
            lines.append(f"  [{verdict}] {check.name} ({check.checked} {unit} checked)")
            for tx, message in list(check.failures.items())[:examples]:
                lines.append(f"      {tx}: {message}")
                lines.extend("        " + x for x in self.examples.get(tx, "").splitlines())
        return "\n".join(lines)


def _numbers(rows: list[Attempt]) -> list[int]:
    return sorted(r.attempt for r in rows)


@dataclass(frozen=True)
class Unit:
    """One transaction the model knows of: a started one, or a nested one that its parent
    runs (its steps follow the started transaction's plan)."""

    tx: str
    workflow: str
    plan: Plan
    prediction: Prediction
    parent: str | None = None
    """The transaction whose nested step runs this one."""
    top: str = ""
    """The started transaction it belongs to (itself, for a started one)."""


def units_of(tx: str, plan: Plan) -> list[Unit]:
    """The started transaction ``tx`` and the nested ones the model says it runs, parents
    first."""
    out: list[Unit] = []

    def walk(tx_: str, workflow: str, prediction: Prediction, parent: str | None) -> None:
        out.append(Unit(tx_, workflow, plan, prediction, parent, tx))
        index = {n.name: n for n in workflow_of(workflow).graph.nodes}
        for step, runs in sorted(prediction.children.items()):
            child = index[step].workflow
            assert child is not None
            for child_tx, child_prediction in runs:
                walk(child_tx, child, child_prediction, tx_)

    walk(tx, plan.workflow, predict(plan, tx), None)
    return out


def children_seen(tx: str, step: str, known: set[str]) -> list[str]:
    """The ids in ``known`` of nested transactions that ``step`` of ``tx`` ran, in attempt
    order (``<tx>:<step>``, then ``<tx>:<step>:attempt-<n>``)."""
    base = f"{tx}:{step}"
    found: list[tuple[int, str]] = []
    for other in known:
        if other == base:
            found.append((1, other))
        elif other.startswith(base + ":attempt-") and other[len(base) + 9 :].isdigit():
            found.append((int(other[len(base) + 9 :]), other))
    return [t for _, t in sorted(found)]


def _family(top: str, known: set[str]) -> list[str]:
    """A started transaction and every nested transaction under it in ``known``."""
    return [top, *sorted(t for t in known if t.startswith(top + ":"))]


def _describe_one(
    tx: str, plan: Plan | None, final: WorkflowResult | None, ledger: LedgerData, t0: float
) -> list[str]:
    out = [f"[{tx}]"]
    if plan is not None:
        out.append(
            f"plan: {plan.workflow} fail={plan.fail} flaky={plan.flaky} "
            f"comp_flaky={plan.comp_flaky}"
        )
    out.append(
        "final: "
        + (
            "none"
            if final is None
            else f"{final.workflow} {final.state.value} steps="
            + ", ".join(
                f"{s.name}:{s.state.value}/{s.attempts}/{s.compensate_attempts}"
                for s in final.steps
            )
            + "".join(f"\nerror: {e.step} {e.action} {e.type}: {e.message}" for e in final.errors)
        )
    )
    for a in ledger.attempts.get(tx, []):
        ended = "-" if a.ended is None else f"{a.ended - t0:.3f}"
        out.append(
            f"{a.step} {a.action} #{a.attempt} {a.started - t0:.3f}..{ended} {a.outcome} "
            f"deliveries={a.deliveries}"
        )
    return out


def _describe(
    top: str,
    plan: Plan,
    finals: dict[str, WorkflowResult | None],
    ledger: LedgerData,
    known: set[str],
) -> str:
    """A started transaction and its nested ones: plan, final states and ledger rows (times
    from the family's first row)."""
    family = _family(top, known)
    t0 = min((a.started for tx in family for a in ledger.attempts.get(tx, [])), default=0.0)
    out: list[str] = []
    for tx in family:
        out += _describe_one(tx, plan if tx == top else None, finals.get(tx), ledger, t0)
    return "\n".join(out)


def check_run(
    plans: dict[str, Plan],
    finals: dict[str, WorkflowResult | None],
    ledger: LedgerData,
    figures: dict[str, Any] | None = None,
    resources: Resources | None = None,
) -> Report:
    """Every check of the chaos test over one run; ``figures`` are added to the report's, and
    ``resources`` (the streams and buckets at the end) get the checks of
    :func:`check_resources`.

    ``plans`` are the started transactions; ``finals`` the final states of those and of the
    nested transactions (children) they ran. A child is checked on its own like any
    transaction (its ledger rows carry its own id), and with its parent: the parent's nested
    step ran the children the model says, their compensations come in the parent's reverse
    order (after the steps after the nested step, before the steps before it), and no step of
    the family started after the parent began compensating."""
    lost = Check("every transaction final (0 lost)")
    lost_nested = Check("every nested transaction final (0 lost)")
    model = Check("final state and result as the model predicts")
    attempts_check = Check("invoke attempts (and nested runs) as the model predicts")
    once = Check("reverted: each effect compensated exactly once")
    order = Check("reverted: compensations in reverse dependency order (across nesting)")
    clean = Check("done: no compensation")
    forward = Check("no forward step started after compensation began (across nesting)")
    rerun = Check("no handler run (redelivery included) after compensation began")
    checks = [lost, lost_nested, model, attempts_check, once, order, clean, forward, rerun]

    units = [u for tx, plan in plans.items() for u in units_of(tx, plan)]
    by_tx = {u.tx: u for u in units}
    known = set(by_tx) | set(ledger.attempts) | set(finals)
    states: Counter[str] = Counter()
    nested_states: Counter[str] = Counter()

    def comps_of(tx: str) -> list[Attempt]:
        return [r for r in ledger.attempts.get(tx, []) if r.action == "compensate"]

    def descendants(tx: str) -> list[str]:
        """The nested transactions under ``tx`` (its children, theirs...), not its siblings
        (``<parent>:<step>:attempt-2`` is no child of ``<parent>:<step>``)."""
        unit = by_tx.get(tx)
        if unit is None:
            return []
        out: list[str] = []
        for node in workflow_of(unit.workflow).graph.nodes:
            if node.kind == "subflow":
                for child in children_seen(tx, node.name, known):
                    out += [child, *descendants(child)]
        return out

    for unit in units:
        tx, plan, prediction = unit.tx, unit.plan, unit.prediction
        final = finals.get(tx)
        check = lost if unit.parent is None else lost_nested
        check.checked += 1
        state = "missing" if final is None else final.state.value
        (states if unit.parent is None else nested_states)[state] += 1
        if state not in FINAL_STATES:
            check.fail(tx, f"state {state}")
            continue
        assert final is not None
        graph = {n.name: n for n in workflow_of(unit.workflow).graph.nodes}
        leaves = {s for s in prediction.invoked if graph[s].kind == "step"}
        rows = ledger.attempts.get(tx, [])
        invokes = [r for r in rows if r.action == "invoke"]
        comps = [r for r in rows if r.action == "compensate"]
        by_step: dict[str, list[Attempt]] = defaultdict(list)
        comp_by_step: dict[str, list[Attempt]] = defaultdict(list)
        for r in invokes:
            by_step[r.step].append(r)
        for r in comps:
            comp_by_step[r.step].append(r)
        seen = {
            n: children_seen(tx, n, known) for n, node in graph.items() if node.kind == "subflow"
        }

        # the final state and result
        model.checked += 1
        if state != prediction.state:
            model.fail(tx, f"state {state}, the model says {prediction.state}")
        elif state == "done" and final.result != prediction.result:
            model.fail(tx, f"result {final.result!r}, the model says {prediction.result!r}")
        elif state == "reverted" and prediction.cause == "self":
            reported = {e.step for e in final.errors if e.action == "invoke"}
            if not prediction.failing & reported:
                model.fail(
                    tx, f"errors name {sorted(reported)}, none of {sorted(prediction.failing)}"
                )

        # invoke attempts, and the nested transactions each nested step ran
        attempts_check.checked += 1
        layers = layers_of(unit.workflow)
        level_of = {s: i for i, layer in enumerate(layers) for s in layer}
        if set(by_step) != leaves:
            attempts_check.fail(tx, f"invoked {sorted(by_step)}, the model says {sorted(leaves)}")
        for step, step_rows in by_step.items():
            numbers = _numbers(step_rows)
            if numbers != list(range(1, len(numbers) + 1)):
                attempts_check.fail(tx, f"{step}: attempts {numbers} are not 1..n")
                continue
            cut = prediction.fail_level is not None and level_of[step] == prediction.fail_level
            if plan.fail.get(step) == "permanent":
                wanted = 1
            elif plan.fail.get(step) == "exhaust":
                wanted = MAX_RETRIES + 1
            else:
                wanted = plan.flaky.get(step, 0) + 1
            if len(numbers) > wanted or (not cut and len(numbers) != wanted):
                attempts_check.fail(tx, f"{step}: {len(numbers)} attempts, the model says {wanted}")
        for step, ran in seen.items():
            expected = [i for i, _ in prediction.children.get(step, [])]
            if ran != expected:
                attempts_check.fail(
                    tx, f"{step}: nested transactions {ran}, the model says {expected}"
                )

        # compensations
        if state == "done":
            clean.checked += 1
            if comps:
                clean.fail(tx, f"compensated {sorted({r.step for r in comps})}")
        if state == "reverted":
            once.checked += 1
            ok = {s: [r for r in rs if r.outcome == "ok"] for s, rs in comp_by_step.items()}
            if set(comp_by_step) != set(by_step):
                once.fail(
                    tx,
                    f"compensated {sorted(comp_by_step)} but invoked {sorted(by_step)}",
                )
            for step in by_step:
                good = ok.get(step, [])
                if len(good) != 1:
                    once.fail(tx, f"{step}: {len(good)} successful compensations")
                    continue
                wanted = 2 if step in plan.comp_flaky else 1
                numbers = _numbers(comp_by_step[step])
                if numbers != list(range(1, wanted + 1)):
                    once.fail(tx, f"{step}: compensation attempts {numbers}, wanted {wanted}")
                done = any(r.outcome == "ok" for r in by_step[step])
                payload = {"step": step, "output": prediction.outputs[step]} if done else None
                if good[0].payload != payload:
                    once.fail(tx, f"{step}: compensated with {good[0].payload!r}, not {payload!r}")

            # A nested step counts as the compensations in its children: all of them (and
            # their own children's) must end before a step before it begins compensating; the
            # ones this transaction asked for (a child that ended done) begin only after the
            # steps after it ended compensating.
            order.checked += 1
            begins: dict[str, list[Attempt]] = dict(comp_by_step)
            ends: dict[str, list[Attempt]] = dict(comp_by_step)
            for step, ran in seen.items():
                family = [d for child in ran for d in [child, *descendants(child)]]
                undone = [c for c in ran if c in by_tx and by_tx[c].prediction.cause == "parent"]
                every = [r for d in family for r in comps_of(d)]
                asked = [r for c in undone for d in [c, *descendants(c)] for r in comps_of(d)]
                if every:
                    ends[step] = every
                if asked:
                    begins[step] = asked
            after = successors(unit.workflow)
            for step, step_comps in begins.items():
                begun = min(r.started for r in step_comps)
                for later in sorted(after[step] & set(ends)):
                    good_ends = [r.ended for r in ends[later] if r.outcome == "ok"]
                    ended = [e for e in good_ends if e is not None]
                    if not ended or max(ended) > begun:
                        order.fail(
                            tx, f"{step} compensation began before {later}'s compensation ended"
                        )

        # forward steps: none (of this transaction or a nested one under it) after this
        # transaction began compensating, itself or a child that had ended done
        undone_children = [
            d
            for ran in seen.values()
            for c in ran
            if c in by_tx and by_tx[c].prediction.cause == "parent"
            for d in [c, *descendants(c)]
        ]
        compensating = comps + [r for d in undone_children for r in comps_of(d)]
        if compensating:
            forward.checked += 1
            rerun.checked += 1
            began = min(r.started for r in compensating)
            under = [tx, *descendants(tx)]
            every_invoke = [
                r for d in under for r in ledger.attempts.get(d, []) if r.action == "invoke"
            ]
            late = [r for r in every_invoke if r.started > began]
            if late:
                first = min(late, key=lambda r: r.started)
                forward.fail(
                    tx,
                    f"{first.step} #{first.attempt} (of {first.tx}) started "
                    f"{first.started - began:.3f} s after compensation began",
                )
            runs = [d for t in under for d in ledger.deliveries.get(t, []) if d.action == "invoke"]
            late_runs = [d for d in runs if d.started > began]
            if late_runs:
                d = min(late_runs, key=lambda d: d.started)
                rerun.fail(
                    tx,
                    f"{len(late_runs)} invoke run(s) after compensation began, e.g. {d.step} "
                    f"#{d.attempt} of {d.tx} (pid {d.pid}, {d.started - began:.3f} s after)",
                )

    every_attempt = [a for rows in ledger.attempts.values() for a in rows]
    every_delivery = [d for rows in ledger.deliveries.values() for d in rows]
    totals: dict[str, Any] = {
        "transactions": len(plans),
        "final states": dict(sorted(states.items())),
        "nested transactions (children)": sum(nested_states.values()),
        "nested final states": dict(sorted(nested_states.items())),
        "effects (successful invokes)": sum(
            1 for a in every_attempt if a.action == "invoke" and a.outcome == "ok"
        ),
        "compensations (successful)": sum(
            1 for a in every_attempt if a.action == "compensate" and a.outcome == "ok"
        ),
        "attempts (invoke/compensate)": "{}/{}".format(
            sum(1 for a in every_attempt if a.action == "invoke"),
            sum(1 for a in every_attempt if a.action == "compensate"),
        ),
        "handler runs": len(every_delivery),
        "duplicates delivered (runs - attempts)": len(every_delivery) - len(every_attempt),
        "runs cut off (killed mid-handler)": sum(1 for d in every_delivery if d.ended is None),
    }
    totals.update(figures or {})
    report = Report(totals, checks)
    if resources is not None:
        finished = {kv_key(t) for t, r in finals.items() if r is not None and r.state.finished}
        report.checks += check_resources(resources, {kv_key(t) for t in known}, finished)
        report.sections["streams and buckets at the end"] = resources.describe()
    for check in checks:
        for tx in list(check.failures)[:2]:
            known_unit = by_tx.get(tx)
            top = known_unit.top if known_unit is not None else tx
            if top in plans:
                report.examples.setdefault(tx, _describe(top, plans[top], finals, ledger, known))
    return report


def nested_ids(plans: dict[str, Plan]) -> list[str]:
    """The ids of the nested transactions the model says the started ones run."""
    return [u.tx for tx, plan in plans.items() for u in units_of(tx, plan) if u.parent]


# --- the streams and buckets at the end ---------------------------------------------------------


@dataclass(frozen=True)
class StreamSize:
    """What the harness read of one JetStream stream (``stream_info``)."""

    name: str
    retention: str
    """``workqueue``, ``limits`` or ``interest``."""
    messages: int
    bytes: int
    max_age: float
    """Seconds (0: no age limit)."""
    max_msgs_per_subject: int
    allow_msg_ttl: bool
    live_keys: int | None = None
    """For a bucket: the keys with a value (delete markers left out)."""
    some_keys: tuple[str, ...] = ()
    """For a bucket: a few of those keys (examples)."""


@dataclass
class Resources:
    """The streams and buckets of one deployment prefix after the run, as the harness read
    them once the services had settled (or its deadline passed)."""

    work: str
    events: str
    hooks: str
    live: str
    done: str
    leases: str
    """The stream names (a bucket ``b`` is the stream ``KV_b``)."""
    partitions: int
    members: int
    """Coordinators of the run: each holds one member key in the leases bucket."""
    streams: dict[str, StreamSize] = field(default_factory=dict)
    """Name -> size; a stream that could not be read is missing (see ``errors``)."""
    done_keys: list[str] = field(default_factory=list)
    """The live keys of the done bucket."""
    done_ttls: dict[str, str | None] = field(default_factory=dict)
    """Some done keys -> the ``Nats-TTL`` header of their entry (None: no header)."""
    waited: float = 0.0
    """Seconds the harness waited for the services to settle."""
    settled: bool = False
    """Whether the settling conditions (work queue empty, no live transaction, leases within
    bounds) held before the deadline."""
    errors: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = [
            f"{'settled' if self.settled else 'NOT settled'} after {self.waited:.1f} s "
            "(work queue empty, no live transaction, leases within partitions + members)"
        ]
        width = max((len(n) for n in self.streams), default=0)
        for name in (self.work, self.events, self.hooks, self.live, self.done, self.leases):
            size = self.streams.get(name)
            if size is None:
                lines.append(f"{name:<{width}}  (not read)")
                continue
            age = f"max_age {size.max_age:g} s" if size.max_age else "no max_age"
            keys = "" if size.live_keys is None else f", {size.live_keys} live keys"
            lines.append(
                f"{name:<{width}}  {size.retention}, {size.messages} msgs, {size.bytes} bytes"
                f"{keys}, {age}"
            )
        ttls = Counter(str(ttl) for ttl in self.done_ttls.values())
        sample = ", ".join(f"{n} with {ttl}" for ttl, n in sorted(ttls.items())) or "none read"
        lines.append(f"{self.done} entries sampled for their Nats-TTL (s): {sample}")
        lines.extend(f"error: {e}" for e in self.errors)
        return lines


def check_resources(
    resources: Resources, transactions: set[str], finished: set[str]
) -> list[Check]:
    """Nothing grows without bound: the work queue is a work queue and empty, no live
    transaction is left, the done bucket has one entry per finished transaction with a ttl,
    the leases bucket holds a key per partition and member at most, and the event and hook
    streams have an age limit. ``transactions``: every transaction id of the run (as bucket
    keys, which they are for the harness's ids); ``finished``: those found final."""
    r = resources
    streams = r.streams
    checks: list[Check] = []

    def check(name: str, stream: str) -> tuple[Check, StreamSize | None]:
        c = Check(name, unit="streams")
        c.checked = 1
        checks.append(c)
        size = streams.get(stream)
        if size is None:
            c.fail(stream, "could not be read: " + ("; ".join(r.errors) or "missing"))
        return c, size

    work, size = check("work queue: a work-queue stream, 0 messages left", r.work)
    if size is not None:
        if size.retention != "workqueue":
            work.fail(r.work, f"retention {size.retention}, not workqueue")
        elif size.messages:
            work.fail(r.work, f"{size.messages} messages left ({size.bytes} bytes)")

    live, size = check("live bucket: no live transaction left", r.live)
    if size is not None and size.live_keys:
        live.fail(
            r.live,
            f"{size.live_keys} live keys ({size.messages} messages), e.g. {list(size.some_keys)}",
        )
    elif size is not None and size.live_keys is None:
        live.fail(r.live, "its keys could not be listed")

    done, size = check("done bucket: one entry per finished transaction, each with a ttl", r.done)
    if size is not None:
        keys = set(r.done_keys)
        strangers = sorted(keys - transactions)
        missing = sorted(finished - keys)
        untimed = sorted(k for k, ttl in r.done_ttls.items() if not ttl)
        if size.messages > len(transactions):
            done.fail(r.done, f"{size.messages} messages for {len(transactions)} transactions")
        elif size.max_msgs_per_subject != 1:
            done.fail(r.done, f"max_msgs_per_subject {size.max_msgs_per_subject}, not 1")
        elif strangers:
            done.fail(r.done, f"{len(strangers)} keys of no transaction, e.g. {strangers[0]}")
        elif missing:
            done.fail(r.done, f"{len(missing)} finished transactions missing, e.g. {missing[0]}")
        elif not size.allow_msg_ttl:
            done.fail(r.done, "the stream does not allow per-message ttls")
        elif keys and not r.done_ttls:
            done.fail(r.done, "no entry could be read to see its ttl")
        elif untimed:
            done.fail(r.done, f"{len(untimed)} sampled entries have no Nats-TTL, e.g. {untimed[0]}")

    leases, size = check("leases bucket: at most partitions + members live keys", r.leases)
    bound = r.partitions + r.members
    if size is not None and size.live_keys is None:
        leases.fail(r.leases, "its keys could not be listed")
    elif size is not None and size.live_keys is not None and size.live_keys > bound:
        leases.fail(r.leases, f"{size.live_keys} live keys, more than {bound}")

    for stream in (r.events, r.hooks):
        logs, size = check(f"{stream}: limits retention with a max_age", stream)
        if size is not None and (size.retention != "limits" or not size.max_age > 0):
            logs.fail(stream, f"retention {size.retention}, max_age {size.max_age}")
    return checks
