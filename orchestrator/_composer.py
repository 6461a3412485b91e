"""Composition: ``create_workflow``, proxies, ``transform``, ``parallelize``, ``when``, hooks.

A composer runs once, at definition time, inside a :class:`_Recorder`. Step calls, transforms
and the rest record what they would do and hand back :class:`WorkflowData` proxies that stand for
values known only at run time. The record is compiled into a :class:`~._graph.Graph`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, overload

import msgspec

from ._errors import CompositionError, ConfigurationError
from ._graph import (
    INPUT,
    CondExpr,
    DictExpr,
    Expr,
    Graph,
    HookResultExpr,
    ListExpr,
    Lit,
    Node,
    ProjectExpr,
    Ref,
    TransformExpr,
    WhenBlock,
)
from ._step import Handler, Step, StepConfig, make_config

if TYPE_CHECKING:
    from ._types import WorkflowResult

__all__ = [
    "Hook",
    "Workflow",
    "WorkflowData",
    "WorkflowResponse",
    "create_hook",
    "create_workflow",
    "parallelize",
    "transform",
    "when",
]

_recorder: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "orchestrator_composer", default=None
)

_literal_encoder = msgspec.msgpack.Encoder()


# ---------------------------------------------------------------------------------- recording
@dataclasses.dataclass(eq=False)
class _Unit:
    """A step (or hook point, or nested workflow) recorded by the composer."""

    name: str
    kind: str
    input: Expr
    config: StepConfig
    blocks: tuple[str, ...]
    step: Step | None = None
    workflow: Workflow | None = None
    hook: str | None = None
    validator: Any = None


@dataclasses.dataclass(eq=False)
class _Parallel:
    branches: list[list[_Stage]]


_Stage = _Unit | _Parallel


class _Recorder:
    def __init__(self, workflow: str) -> None:
        self.workflow = workflow
        self.seq: list[_Stage] = []
        self.units: list[_Unit] = []
        self.when_stack: list[str] = []
        self.whens: dict[str, WhenBlock] = {}
        self.when_counter = itertools.count(1)
        self.transform_counter = itertools.count(1)

    def add(self, unit: _Unit) -> None:
        self.seq.append(unit)
        self.units.append(unit)

    def top_index(self, unit: _Unit) -> int:
        for i in range(len(self.seq) - 1, -1, -1):
            if _contains(self.seq[i], unit):
                return i
        raise CompositionError(
            f"{unit.name!r} was composed inside another block; parallelize the block instead"
        )


def _contains(stage: _Stage, unit: _Unit) -> bool:
    if stage is unit:
        return True
    if isinstance(stage, _Parallel):
        return any(_contains(s, unit) for branch in stage.branches for s in branch)
    return False


def _current(what: str) -> _Recorder:
    rec = _recorder.get()
    if rec is None:
        raise CompositionError(
            f"{what} can only be used inside a workflow composer (a function given to "
            "create_workflow); to run a step, run the workflow"
        )
    return rec


# ------------------------------------------------------------------------------------ proxies
_FORBIDDEN = "use transform(...) to compute with it, or when(...) to branch on it"


class WorkflowData:
    """A value known only at run time: the workflow input, a step output, a transform...

    It supports ``.attr`` and ``["key"]`` (references into the run-time value) and nothing else.
    """

    __slots__ = ("_expr", "_units")
    _expr: Expr
    _units: tuple[_Unit, ...]

    def __init__(self, expr: Expr, units: tuple[_Unit, ...] = ()) -> None:
        object.__setattr__(self, "_expr", expr)
        object.__setattr__(self, "_units", units)

    def __getattr__(self, name: str) -> WorkflowData:
        if name.startswith("__"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, key: str | int) -> WorkflowData:
        if not isinstance(key, str | int):
            raise CompositionError(f"a workflow value can be indexed by str or int, not {key!r}")
        expr = self._expr
        if isinstance(expr, Ref):
            return WorkflowData(Ref(expr.source, (*expr.path, key)), self._units)
        if isinstance(expr, ProjectExpr):
            return WorkflowData(ProjectExpr(expr.base, (*expr.path, key)), self._units)
        return WorkflowData(ProjectExpr(expr, (key,)), self._units)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        self._refuse(f"setting .{name}")

    def _refuse(self, what: str) -> NoReturn:
        raise CompositionError(
            f"{what} on a WorkflowData proxy: its value is only known at run time; {_FORBIDDEN}"
        )

    def __bool__(self) -> NoReturn:
        self._refuse("bool()")

    def __len__(self) -> NoReturn:
        self._refuse("len()")

    def __iter__(self) -> Iterator[Any]:
        self._refuse("iteration")

    def __contains__(self, item: Any) -> NoReturn:
        self._refuse("'in'")

    def __eq__(self, other: object) -> NoReturn:
        self._refuse("comparison (==)")

    def __ne__(self, other: object) -> NoReturn:
        self._refuse("comparison (!=)")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<WorkflowData {self._expr!r}>"


def _arith(op: str) -> Callable[..., NoReturn]:
    def refuse(self: WorkflowData, *args: Any) -> NoReturn:
        self._refuse(f"the operator {op}")

    return refuse


for _name, _op in {
    "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">=",
    "__add__": "+", "__radd__": "+", "__sub__": "-", "__rsub__": "-", "__mul__": "*",
    "__rmul__": "*", "__truediv__": "/", "__rtruediv__": "/", "__floordiv__": "//",
    "__rfloordiv__": "//", "__mod__": "%", "__rmod__": "%", "__pow__": "**", "__rpow__": "**",
    "__neg__": "-", "__pos__": "+", "__abs__": "abs()", "__invert__": "~", "__and__": "&",
    "__rand__": "&", "__or__": "|", "__ror__": "|", "__xor__": "^", "__rxor__": "^",
    "__int__": "int()", "__float__": "float()", "__index__": "index()", "__round__": "round()",
    "__matmul__": "@", "__lshift__": "<<", "__rshift__": ">>",
}.items():  # fmt: skip
    setattr(WorkflowData, _name, _arith(_op))


class StepRef(WorkflowData):
    """The output of a step call; ``.config(name=..., **options)`` configures this use."""

    __slots__ = ()

    def config(self, name: str | None = None, **options: Any) -> StepRef:
        """Rename this use of the step and/or override its options."""
        (unit,) = self._units
        if name is not None:
            if not isinstance(name, str) or not name:
                raise CompositionError("config(name=...) needs a non-empty string")
            unit.name = name
        if options:
            unit.config = make_config(unit.config, options)
        expr = self._expr
        new_expr = Ref(unit.name) if isinstance(expr, Ref) else expr
        return StepRef(new_expr, self._units)


def to_expr(value: Any, what: str) -> Expr:
    """Turn a structure of proxies and literals into an expression."""
    if isinstance(value, WorkflowData):
        return value._expr
    if isinstance(value, Hook):
        return value._payload
    if isinstance(value, Mapping):
        items = tuple((k, to_expr(v, what)) for k, v in value.items())
        if all(isinstance(v, Lit) for _, v in items):
            return _literal(dict(value), what)
        for k, _ in items:
            if not isinstance(k, str):
                raise CompositionError(f"{what}: mapping keys must be strings, got {k!r}")
        return DictExpr(items)
    if isinstance(value, list | tuple):
        exprs = tuple(to_expr(v, what) for v in value)
        if all(isinstance(e, Lit) for e in exprs):
            return _literal(list(value), what)
        return ListExpr(exprs)
    return _literal(value, what)


def _literal(value: Any, what: str) -> Lit:
    try:
        _literal_encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise CompositionError(
            f"{what}: {value!r} is neither a workflow value nor something msgspec can encode "
            f"({exc}); build it at run time with transform(...)"
        ) from None
    return Lit(value)


def _units_of(value: Any) -> tuple[_Unit, ...]:
    if isinstance(value, WorkflowData):
        return value._units
    if isinstance(value, Hook):
        return (value._unit,)
    if isinstance(value, Mapping):
        return tuple(u for v in value.values() for u in _units_of(v))
    if isinstance(value, list | tuple):
        return tuple(u for v in value for u in _units_of(v))
    return ()


def record_step(step: Step, input: Any) -> StepRef:
    """Add a step call to the workflow being composed (``Step.__call__``)."""
    rec = _current(f"step {step.name!r}")
    unit = _Unit(
        name=step.name,
        kind="step",
        input=to_expr(input, f"input of step {step.name!r}"),
        config=step.config,
        blocks=tuple(rec.when_stack),
        step=step,
    )
    rec.add(unit)
    return StepRef(Ref(step.name), (unit,))


# ----------------------------------------------------------------------- composition helpers
def transform(values: Any, *fns: Callable[[Any], Any]) -> WorkflowData:
    """A value computed at run time by a pipeline of plain functions: ``fns[-1](...fns[0](v))``.

    Not a step: no retries, no compensation. The functions run where the transaction runs.
    """
    _current("transform")
    if not fns:
        raise CompositionError("transform needs at least one function")
    for fn in fns:
        if not callable(fn):
            raise CompositionError(f"transform: {fn!r} is not callable")
    return WorkflowData(
        TransformExpr(to_expr(values, "transform values"), tuple(fns)), _units_of(values)
    )


def parallelize(*refs: Any) -> tuple[Any, ...]:
    """Run the given step calls concurrently; the next step waits for all of them.

    Returns the references in argument order.
    """
    rec = _current("parallelize")
    # Each argument is a branch: the steps it created (a chain, for a `when` block or a step
    # whose input came from another step call) end at its last step, which marks the branch end.
    spans = []
    for ref in refs:
        indices = [rec.top_index(u) for u in _units_of(ref)]
        if indices:
            spans.append((min(indices), max(indices)))
    if not spans:
        raise CompositionError("parallelize needs step results as arguments")
    marks = {last for _, last in spans}
    start = min(first for first, _ in spans)
    branches: list[list[_Stage]] = []
    current: list[_Stage] = []
    for i in range(start, len(rec.seq)):
        current.append(rec.seq[i])
        if i in marks:
            branches.append(current)
            current = []
    if current:  # stages recorded after the last argument belong to its branch
        branches[-1].extend(current)
    if len(branches) > 1:
        rec.seq[start:] = [_Parallel(branches)]
    return refs


class _When:
    def __init__(self, rec: _Recorder, name: str, values: Expr, predicate: Callable[..., Any]):
        self._rec = rec
        self._name = name
        self._values = values
        self._predicate = predicate
        self._used = False

    def then(self, fn: Callable[[], Any]) -> WorkflowData:
        """Compose the block: steps created by ``fn`` run only when the predicate holds."""
        if self._used:
            raise CompositionError(f"when block {self._name!r}: then() was already called")
        self._used = True
        rec = self._rec
        before = len(rec.units)
        rec.when_stack.append(self._name)
        try:
            value = fn()
        finally:
            rec.when_stack.pop()
        created = tuple(rec.units[before:])
        expr = CondExpr(self._name, to_expr(value, f"result of when block {self._name!r}"))
        return WorkflowData(expr, created or _units_of(value))


def when(*args: Any) -> _When:
    """``when([name,] values, predicate).then(fn)``: a conditional block.

    The predicate gets the resolved ``values`` once, when the block's first step is due; the
    block's result is ``None`` when it was skipped. Unnamed blocks are named ``when-<n>`` in
    composition order, so names are stable across processes.
    """
    rec = _current("when")
    if len(args) == 3:
        name, values, predicate = args
        if not isinstance(name, str) or not name:
            raise CompositionError("when(name, values, predicate): name must be a string")
    elif len(args) == 2:
        values, predicate = args
        name = f"when-{next(rec.when_counter)}"
    else:
        raise CompositionError("when takes ([name,] values, predicate)")
    if not callable(predicate):
        raise CompositionError(f"when {name!r}: the predicate must be callable")
    if name in rec.whens:
        raise CompositionError(f"when block {name!r} is already defined in this workflow")
    expr = to_expr(values, f"values of when block {name!r}")
    rec.whens[name] = WhenBlock(name, expr, predicate)
    return _When(rec, name, expr, predicate)


class Hook:
    """A hook point created by :func:`create_hook`."""

    def __init__(self, name: str, unit: _Unit, payload: Expr) -> None:
        self.name = name
        self._unit = unit
        self._payload = payload

    def get_result(self) -> WorkflowData:
        """The output of the hook's handlers (a list when several are registered)."""
        _current("hook.get_result")
        return WorkflowData(HookResultExpr(self.name, self._unit.validator), (self._unit,))


def create_hook(name: str, payload: Any, result_validator: Any = None) -> Hook:
    """A point where the workflow publishes ``payload`` and runs the hook's handlers as steps.

    ``result_validator`` checks the handlers' output: a callable, an object with ``parse``
    (pydantic/zod style) or a type for ``msgspec.convert``.
    """
    rec = _current("create_hook")
    if not isinstance(name, str) or not name:
        raise CompositionError("create_hook needs a non-empty string name")
    expr = to_expr(payload, f"payload of hook {name!r}")
    unit = _Unit(
        name=name,
        kind="hook",
        input=expr,
        config=StepConfig(no_compensation=True),
        blocks=tuple(rec.when_stack),
        hook=name,
        validator=result_validator,
    )
    rec.add(unit)
    return Hook(name, unit, Ref(name))


@dataclasses.dataclass(frozen=True, slots=True)
class WorkflowResponse:
    """What a composer returns: the result structure and (for typing) the hooks it exposes."""

    result: Any = None
    hooks: tuple[Hook, ...] | list[Hook] = ()


# ---------------------------------------------------------------------------------- workflows
class _HookHandlers:
    """``workflow.hooks``: ``@workflow.hooks.<name>`` registers a handler (several allowed)."""

    def __init__(self, workflow: Workflow) -> None:
        self._workflow = workflow

    def __getattr__(self, hook: str) -> _HookRegistrar:
        if hook.startswith("__"):
            raise AttributeError(hook)
        if hook not in self._workflow._hook_units:
            raise CompositionError(
                f"workflow {self._workflow.name!r} has no hook {hook!r}; "
                f"its hooks: {sorted(self._workflow._hook_units)}"
            )
        return _HookRegistrar(self._workflow, hook)

    def __getitem__(self, hook: str) -> _HookRegistrar:
        return self.__getattr__(hook)


class _HookRegistrar:
    def __init__(self, workflow: Workflow, hook: str) -> None:
        self._workflow = workflow
        self._hook = hook

    def __call__(
        self,
        handler: Handler,
        compensate: Handler | None = None,
        *,
        name: str | None = None,
        **config: Any,
    ) -> Step:
        """Register ``handler`` (and its optional compensation); returns the handler's step."""
        return self._workflow._add_hook_handler(self._hook, handler, compensate, name, config)


class Workflow:
    """A workflow definition. ``workflow(engine).run(...)`` runs it on an engine."""

    def __init__(
        self,
        name: str,
        composer: Callable[[WorkflowData], Any],
        *,
        idempotent: bool = False,
        retention: float | None = None,
        timeout: float | None = None,
        store: bool | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise CompositionError("a workflow needs a non-empty string name")
        if retention is not None and retention < 0:
            raise ConfigurationError(f"workflow {name!r}: retention must be >= 0 seconds")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"workflow {name!r}: timeout must be > 0 seconds")
        self.name = name
        self.idempotent = idempotent
        self.retention = retention
        self.timeout = timeout
        self.store = store
        self.hooks = _HookHandlers(self)
        self._hook_handlers: dict[str, list[_Unit]] = {}
        self._graph: Graph | None = None
        self.__doc__ = composer.__doc__
        self._compose(composer)

    # -- composition
    def _compose(self, composer: Callable[[WorkflowData], Any]) -> None:
        if _recorder.get() is not None:
            raise CompositionError(
                f"workflow {self.name!r} is defined inside another composer; define it at "
                "module level and nest it with run_as_step"
            )
        rec = _Recorder(self.name)
        token = _recorder.set(rec)
        try:
            returned = composer(WorkflowData(Ref(INPUT)))
        finally:
            _recorder.reset(token)
        if isinstance(returned, WorkflowResponse):
            returned = returned.result
        self._result = to_expr(returned, f"workflow {self.name!r} result")
        self._record = rec
        seen: dict[str, _Unit] = {}
        for unit in rec.units:
            if unit.name in seen or unit.name == INPUT:
                raise CompositionError(
                    f"step {unit.name!r} is already defined in workflow {self.name!r}; "
                    f"give the second use another name with .config(name=...)"
                )
            seen[unit.name] = unit
        self._hook_units = {u.name: u for u in rec.units if u.kind == "hook"}

    def _add_hook_handler(
        self,
        hook: str,
        handler: Handler,
        compensate: Handler | None,
        name: str | None,
        config: Mapping[str, Any],
    ) -> Step:
        handlers = self._hook_handlers.setdefault(hook, [])
        taken = set(self.step_definitions()) | {u.name for u in self._record.units}
        if name is None:
            base = f"{hook}-{getattr(handler, '__name__', 'handler')}"
            name = base
            n = 2
            while name in taken:
                name, n = f"{base}-{n}", n + 1
        elif name in taken:
            raise CompositionError(f"workflow {self.name!r} already has a step named {name!r}")
        step = Step(name, handler, compensate, make_config(None, config))
        hook_unit = self._hook_units[hook]
        handlers.append(
            _Unit(
                name=name,
                kind="step",
                input=Ref(hook),
                config=step.config,
                blocks=hook_unit.blocks,
                step=step,
                hook=hook,
            )
        )
        self._graph = None  # recompiled with the new handler
        return step

    # -- compiled form
    @property
    def graph(self) -> Graph:
        """The compiled graph (recompiled after a hook handler is registered)."""
        if self._graph is None:
            self._graph = self._compile()
        return self._graph

    def _compile(self) -> Graph:
        nodes: list[Node] = []
        hook_handlers: dict[str, tuple[str, ...]] = {}

        def emit(unit: _Unit, after: frozenset[str]) -> frozenset[str]:
            # the step handlers of a refreshed unit (hook handlers) are kept in unit.step
            nodes.append(
                Node(
                    name=unit.name,
                    kind=unit.kind,
                    after=tuple(sorted(after)),
                    input=unit.input,
                    config=unit.config if unit.step is None else _merged(unit),
                    blocks=unit.blocks,
                    workflow=unit.workflow.name if unit.workflow else None,
                    hook=unit.hook,
                )
            )
            if unit.kind != "hook":
                return frozenset((unit.name,))
            handlers = self._hook_handlers.get(unit.name, [])
            hook_handlers[unit.name] = tuple(h.name for h in handlers)
            for h in handlers:
                emit(h, frozenset((unit.name,)))
            return frozenset(h.name for h in handlers) or frozenset((unit.name,))

        def seq(stages: list[_Stage], frontier: frozenset[str]) -> frozenset[str]:
            for stage in stages:
                if isinstance(stage, _Parallel):
                    frontier = frozenset().union(*(seq(b, frontier) for b in stage.branches))
                else:
                    frontier = emit(stage, frontier)
            return frontier

        seq(self._record.seq, frozenset())
        return Graph(
            self.name,
            tuple(nodes),
            self._record.whens,
            self._result,
            hook_handlers,
            idempotent=self.idempotent,
            retention=self.retention,
            timeout=self.timeout,
            async_children=frozenset(w.name for w in self.children() if w.graph.has_async),
        )

    # -- registry views
    def step_definitions(self) -> dict[str, Step]:
        """Every step's definition by name, hook handlers included."""
        steps = {u.name: u.step for u in self._record.units if u.step is not None}
        for handlers in self._hook_handlers.values():
            steps.update({u.name: u.step for u in handlers if u.step is not None})
        return steps

    def children(self) -> list[Workflow]:
        """The workflows nested with ``run_as_step``, directly."""
        return [u.workflow for u in self._record.units if u.workflow is not None]

    def hook_validator(self, hook: str) -> Any:
        """The ``result_validator`` given to ``create_hook``."""
        return self._hook_units[hook].validator

    # -- use
    def run_as_step(self, input: Any = None) -> StepRef:
        """Nest this workflow as a step of the workflow being composed."""
        rec = _current(f"{self.name}.run_as_step")
        name = f"{self.name}-as-step"
        unit = _Unit(
            name=name,
            kind="subflow",
            input=to_expr(input, f"input of {name!r}"),
            config=StepConfig(),
            blocks=tuple(rec.when_stack),
            workflow=self,
        )
        rec.add(unit)
        return StepRef(Ref(name), (unit,))

    def __call__(self, engine: Any) -> BoundWorkflow:
        """``workflow(engine).run(...)``: this workflow on an engine (Medusa style)."""
        return BoundWorkflow(self, engine)

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r}>"


def _merged(unit: _Unit) -> StepConfig:
    step = unit.step
    assert step is not None
    cfg = unit.config
    if step.compensation is None and not cfg.no_compensation:
        cfg = msgspec.structs.replace(cfg, no_compensation=True)
    return cfg


class BoundWorkflow:
    """A workflow bound to an engine; its methods forward to the engine's."""

    def __init__(self, workflow: Workflow, engine: Any) -> None:
        self.workflow = workflow
        self.engine = engine

    async def run(self, input: Any = None, **options: Any) -> WorkflowResult:
        """Run the workflow and wait for it (``engine.run``)."""
        result: WorkflowResult = await self.engine.run(self.workflow, input=input, **options)
        return result

    async def start(self, input: Any = None, **options: Any) -> Any:
        """Start the workflow and return its handle at once (``engine.start``)."""
        return await self.engine.start(self.workflow, input=input, **options)


@overload
def create_workflow(
    name: str,
    composer: None = None,
    *,
    idempotent: bool = ...,
    retention: float | None = ...,
    timeout: float | None = ...,
    store: bool | None = ...,
) -> Callable[[Callable[[WorkflowData], Any]], Workflow]: ...
@overload
def create_workflow(
    name: str,
    composer: Callable[[WorkflowData], Any],
    *,
    idempotent: bool = ...,
    retention: float | None = ...,
    timeout: float | None = ...,
    store: bool | None = ...,
) -> Workflow: ...
def create_workflow(
    name: str,
    composer: Callable[[WorkflowData], Any] | None = None,
    *,
    idempotent: bool = False,
    retention: float | None = None,
    timeout: float | None = None,
    store: bool | None = None,
) -> Workflow | Callable[[Callable[[WorkflowData], Any]], Workflow]:
    """Define a workflow; also usable as a decorator ``@create_workflow(name, ...)``.

    The composer runs once, now, with :class:`WorkflowData` proxies.
    """
    options = {"idempotent": idempotent, "retention": retention, "timeout": timeout, "store": store}
    if composer is None:

        def decorate(fn: Callable[[WorkflowData], Any]) -> Workflow:
            return Workflow(name, fn, **options)  # type: ignore[arg-type]

        return decorate
    return Workflow(name, composer, **options)  # type: ignore[arg-type]
