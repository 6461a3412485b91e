"""Steps: an action, an optional compensation, and their configuration."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar, overload

import msgspec
import structlog

from ._errors import ConfigurationError, PermanentFailure

__all__ = [
    "Handler",
    "Step",
    "StepConfig",
    "StepContext",
    "StepResponse",
    "create_step",
]

T = TypeVar("T")
Handler = Callable[..., Any]


class StepConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How a step runs. Every field can also be set per use with ``step(x).config(...)``."""

    max_retries: int = 0
    """How many times a failing invoke (or compensation) is retried."""
    retry_interval: float | None = None
    """Seconds before the first retry; ``None`` retries at once."""
    retry_backoff: float = 2.0
    """Factor applied to the interval after each retry."""
    max_retry_interval: float | None = None
    """Upper bound of the interval, in seconds."""
    timeout: float | None = None
    """Seconds an invoke may run; the handler is cancelled past it (state ``timeout``)."""
    async_: bool = False
    """The step completes later: in the background, or by ``set_step_success``."""
    background_execution: bool = False
    """Run the (async) handler in the background; implied by an async handler that returns."""
    compensate_async: bool = False
    """Like ``async_``, for the compensation."""
    continue_on_permanent_failure: bool = False
    """A step that fails for good is recorded and the run goes on (its output is ``None``)."""
    skip_on_permanent_failure: bool | str = False
    """A step that fails for good skips the steps after it (up to the named step)."""
    no_compensation: bool = False
    """Computed from the absence of a compensation; ``.config`` may override it."""
    concurrency: int | None = None
    """At most this many concurrent runs of the step per worker (``None``: no limit)."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("retry_interval", "max_retry_interval", "timeout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigurationError(f"{name} must be >= 0 seconds, got {value}")
        if self.retry_backoff < 1:
            raise ConfigurationError(f"retry_backoff must be >= 1, got {self.retry_backoff}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {self.concurrency}")

    def retry_delay(self, failures: int) -> float:
        """Seconds to wait before retry number ``failures`` (1-based)."""
        if not self.retry_interval:
            return 0.0
        delay = self.retry_interval * self.retry_backoff ** (failures - 1)
        if self.max_retry_interval is not None:
            delay = min(delay, self.max_retry_interval)
        return float(delay)


_CONFIG_FIELDS = frozenset(StepConfig.__struct_fields__)


def make_config(base: StepConfig | None, options: Mapping[str, Any]) -> StepConfig:
    """Merge keyword options into a config, with a clear error for an unknown option."""
    unknown = set(options) - _CONFIG_FIELDS
    if unknown:
        known = ", ".join(sorted(_CONFIG_FIELDS))
        raise ConfigurationError(f"unknown step option(s) {sorted(unknown)}; known: {known}")
    try:
        if base is None:
            return StepConfig(**options)
        return msgspec.structs.replace(base, **options)
    except TypeError as exc:  # wrong value type for a field
        raise ConfigurationError(str(exc)) from exc


class StepResponse(Generic[T]):
    """A step's output plus what its compensation receives (default: the output)."""

    __slots__ = ("compensate_input", "output")

    _UNSET: typing.ClassVar[Any] = object()

    def __init__(self, output: T = None, compensate_input: Any = _UNSET) -> None:  # type: ignore[assignment]
        self.output = output
        self.compensate_input = (
            output if compensate_input is StepResponse._UNSET else compensate_input
        )

    @staticmethod
    def permanent_failure(
        message: str = "Permanent failure", compensate_input: Any = None
    ) -> typing.NoReturn:
        """Fail the step for good (no retries); the compensation gets ``compensate_input``."""
        raise PermanentFailure(message, compensate_input)

    @staticmethod
    def skip() -> SkipStep:
        """Return this from a handler to mark the step ``skipped`` (dependants see ``None``)."""
        return SKIP

    def __repr__(self) -> str:
        return f"StepResponse({self.output!r}, compensate_input={self.compensate_input!r})"


class SkipStep:
    """The marker returned by :meth:`StepResponse.skip`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "StepResponse.skip()"


SKIP = SkipStep()


class Container(typing.Protocol):
    """Anything with ``resolve(name)``."""

    def resolve(self, name: str) -> Any: ...


class _MappingContainer:
    __slots__ = ("_mapping",)

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        self._mapping = mapping

    def resolve(self, name: str) -> Any:
        try:
            return self._mapping[name]
        except KeyError:
            raise ConfigurationError(
                f"container has no {name!r}; it has {sorted(self._mapping)}"
            ) from None

    def __getitem__(self, name: str) -> Any:
        return self.resolve(name)


def as_container(container: Any) -> Container:
    """Wrap a mapping so it has ``resolve``; pass anything with ``resolve`` through."""
    if container is None:
        return _MappingContainer({})
    if hasattr(container, "resolve"):
        return typing.cast(Container, container)
    if isinstance(container, Mapping):
        return _MappingContainer(container)
    raise ConfigurationError("container must be a mapping or have a resolve(name) method")


class StepContext:
    """What a handler knows about the run it belongs to."""

    __slots__ = (
        "_context",
        "_context_bytes",
        "_log",
        "action",
        "attempt",
        "container",
        "step_name",
        "transaction_id",
        "workflow_id",
    )

    def __init__(
        self,
        *,
        workflow_id: str,
        step_name: str,
        action: str,
        transaction_id: str,
        attempt: int,
        container: Container,
        context: dict[str, Any] | None = None,
        context_bytes: bytes | None = None,
    ) -> None:
        self._fill(
            workflow_id,
            step_name,
            action,
            transaction_id,
            attempt,
            container,
            context,
            context_bytes,
        )

    def _fill(
        self,
        workflow_id: str,
        step_name: str,
        action: str,
        transaction_id: str,
        attempt: int,
        container: Container,
        context: dict[str, Any] | None,
        context_bytes: bytes | None,
    ) -> None:
        self.workflow_id = workflow_id
        self.step_name = step_name
        self.action = action
        self.transaction_id = transaction_id
        self.attempt = attempt
        self.container = container
        self._context = context
        self._context_bytes = context_bytes
        self._log: Any = None

    @classmethod
    def _make(
        cls,
        workflow_id: str,
        step_name: str,
        action: str,
        transaction_id: str,
        attempt: int,
        container: Container,
        context_bytes: bytes | None,
    ) -> StepContext:
        """The executor's constructor: positional, so a step's run pays no keyword binding."""
        ctx = cls.__new__(cls)
        ctx._fill(
            workflow_id, step_name, action, transaction_id, attempt, container, None, context_bytes
        )
        return ctx

    @property
    def idempotency_key(self) -> str:
        """``"<workflow>:<transaction>:<step>:<action>"``: an opaque, stable key per step action."""
        return f"{self.workflow_id}:{self.transaction_id}:{self.step_name}:{self.action}"

    @property
    def context(self) -> dict[str, Any]:
        """The run's shared context dict (decoded on first use)."""
        if self._context is None:
            raw = self._context_bytes
            self._context = msgspec.msgpack.decode(raw) if raw else {}
        return self._context

    @property
    def log(self) -> Any:
        """A structlog logger bound to workflow, transaction, step, action and attempt."""
        if self._log is None:
            self._log = structlog.get_logger("orchestrator.step").bind(
                workflow=self.workflow_id,
                transaction=self.transaction_id,
                step=self.step_name,
                action=self.action,
                attempt=self.attempt,
            )
        return self._log

    def __repr__(self) -> str:
        return f"<StepContext {self.idempotency_key} attempt={self.attempt}>"


class Step:
    """A step definition: call it inside a workflow composer to add it to the workflow."""

    def __init__(
        self,
        name: str,
        invoke: Handler,
        compensate: Handler | None = None,
        config: StepConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a step needs a non-empty string name")
        if not callable(invoke):
            raise ConfigurationError(f"step {name!r}: the invoke handler must be callable")
        self.name = name
        self.invoke = _HandlerSpec.of(name, invoke)
        self.compensation: _HandlerSpec | None = None
        self._config = config or StepConfig()
        if compensate is not None:
            self.compensate(compensate)

    @property
    def config(self) -> StepConfig:
        """The step's configuration; ``no_compensation`` follows the compensation's presence."""
        if self.compensation is None and not self._config.no_compensation:
            return msgspec.structs.replace(self._config, no_compensation=True)
        return self._config

    def compensate(self, fn: Handler) -> Handler:
        """Attach the compensation (usable as a decorator)."""
        if not callable(fn):
            raise ConfigurationError(f"step {self.name!r}: the compensation must be callable")
        self.compensation = _HandlerSpec.of(self.name, fn)
        return fn

    def __call__(self, input: Any = None) -> Any:
        from ._composer import record_step  # the composer owns the recording context

        return record_step(self, input)

    def __repr__(self) -> str:
        return f"<Step {self.name!r}>"


@dataclasses.dataclass(frozen=True, slots=True)
class _HandlerSpec:
    """A handler with what calling it needs: sync or async, arity, input conversion."""

    fn: Handler
    is_async: bool
    arity: int
    input_type: Any

    @classmethod
    def of(cls, step: str, fn: Handler) -> _HandlerSpec:
        sig = inspect.signature(fn)
        params = [
            p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
        arity = 2 if varargs else len(params)
        if arity > 2:
            raise ConfigurationError(
                f"step {step!r}: handler {fn.__qualname__} takes {arity} required arguments; "
                "a handler is handler(input, ctx)"
            )
        input_type: Any = None
        if params:
            try:
                hints = typing.get_type_hints(fn)
            except Exception:  # unresolvable forward references: no conversion
                hints = {}
            hint = hints.get(params[0].name)
            if hint is not None and _convertible(hint):
                input_type = hint
        return cls(fn, inspect.iscoroutinefunction(fn), arity, input_type)


def _convertible(tp: Any) -> bool:
    if isinstance(tp, type):
        return (
            issubclass(tp, msgspec.Struct)
            or dataclasses.is_dataclass(tp)
            or typing.is_typeddict(tp)
        )
    return False


@overload
def create_step(
    name: str, invoke: None = None, compensate: Handler | None = None, **config: Any
) -> Callable[[Handler], Step]: ...
@overload
def create_step(
    name: str, invoke: Handler, compensate: Handler | None = None, **config: Any
) -> Step: ...
def create_step(
    name: str, invoke: Handler | None = None, compensate: Handler | None = None, **config: Any
) -> Step | Callable[[Handler], Step]:
    """Define a step: ``create_step(name, invoke, compensate, **config)``.

    Without ``invoke`` it is a decorator: ``@create_step("charge", timeout=10)``; attach the
    compensation with ``@charge.compensate``.
    """
    cfg = make_config(None, config)
    if invoke is None:

        def decorate(fn: Handler) -> Step:
            return Step(name, fn, compensate, cfg)

        return decorate
    return Step(name, invoke, compensate, cfg)
