"""The compiled form of a workflow: nodes with their predecessors, and value expressions.

A composer runs once and records what it did; :func:`compile_graph` turns that record into a
:class:`Graph`: steps in composition order, each with the steps it waits for (``after``), the
expression of its input, its configuration and the ``when`` blocks around it. The coordinator
resolves expressions against a transaction's data; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ._step import StepConfig

__all__ = [
    "INPUT",
    "CondExpr",
    "DictExpr",
    "Expr",
    "Graph",
    "HookResultExpr",
    "ListExpr",
    "Lit",
    "Node",
    "ProjectExpr",
    "Ref",
    "Resolver",
    "TransformExpr",
    "WhenBlock",
]

INPUT = "$input"
"""The source name of the workflow input in a :class:`Ref`."""


class Resolver:
    """What resolving an expression needs; the coordinator implements it over its state."""

    def source(self, name: str) -> Any:  # pragma: no cover - interface
        """A fresh decoded copy of the workflow input (``$input``) or of a step's output."""
        raise NotImplementedError

    def condition(self, block: str) -> bool:  # pragma: no cover - interface
        """Whether the ``when`` block held (it has been decided before its steps ran)."""
        raise NotImplementedError

    def hook_result(self, hook: str) -> Any:  # pragma: no cover - interface
        """The output of the hook's handlers."""
        raise NotImplementedError


def _step_into(value: Any, key: str | int) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get(key)
    if isinstance(value, list | tuple) and isinstance(key, int):
        return value[key] if -len(value) <= key < len(value) else None
    if isinstance(key, str):
        return getattr(value, key, None)
    return value[key]


class Expr(msgspec.Struct, frozen=True, tag_field="kind"):
    """A value computed from a transaction's data when a step needs it."""

    def resolve(self, env: Resolver) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def sources(self) -> frozenset[str]:
        """The step names (and ``$input``) this expression reads."""
        return frozenset()


class Lit(Expr, frozen=True, tag="lit"):
    value: Any

    def resolve(self, env: Resolver) -> Any:
        return _copy_literal(self.value)


class Ref(Expr, frozen=True, tag="ref"):
    """The workflow input or a step's output, optionally followed into by ``path``."""

    source: str
    path: tuple[str | int, ...] = ()

    def resolve(self, env: Resolver) -> Any:
        value = env.source(self.source)
        for key in self.path:
            value = _step_into(value, key)
        return value

    def sources(self) -> frozenset[str]:
        return frozenset((self.source,))


class ProjectExpr(Expr, frozen=True, tag="project"):
    """A path into the value of another expression (a transform, a hook result...)."""

    base: Expr
    path: tuple[str | int, ...]

    def resolve(self, env: Resolver) -> Any:
        value = self.base.resolve(env)
        for key in self.path:
            value = _step_into(value, key)
        return value

    def sources(self) -> frozenset[str]:
        return self.base.sources()


class DictExpr(Expr, frozen=True, tag="dict"):
    items: tuple[tuple[str, Expr], ...]

    def resolve(self, env: Resolver) -> Any:
        return {k: v.resolve(env) for k, v in self.items}

    def sources(self) -> frozenset[str]:
        return frozenset().union(*(v.sources() for _, v in self.items))


class ListExpr(Expr, frozen=True, tag="list"):
    items: tuple[Expr, ...]

    def resolve(self, env: Resolver) -> Any:
        return [v.resolve(env) for v in self.items]

    def sources(self) -> frozenset[str]:
        return frozenset().union(*(v.sources() for v in self.items))


class TransformExpr(Expr, frozen=True, tag="transform"):
    """``transform(values, *fns)``: a pipeline of plain functions over resolved values."""

    values: Expr
    fns: tuple[Any, ...]

    def resolve(self, env: Resolver) -> Any:
        value = self.values.resolve(env)
        for fn in self.fns:
            value = fn(value)
        return value

    def sources(self) -> frozenset[str]:
        return self.values.sources()


class CondExpr(Expr, frozen=True, tag="cond"):
    """The value of a ``when`` block: ``None`` when the block was skipped."""

    block: str
    value: Expr

    def resolve(self, env: Resolver) -> Any:
        return self.value.resolve(env) if env.condition(self.block) else None

    def sources(self) -> frozenset[str]:
        return self.value.sources()


class HookResultExpr(Expr, frozen=True, tag="hook_result"):
    """The output of a hook's handlers, checked by the hook's ``result_validator``."""

    hook: str
    validator: Any = None

    def resolve(self, env: Resolver) -> Any:
        value = env.hook_result(self.hook)
        validator = self.validator
        if validator is None:
            return value
        if hasattr(validator, "parse"):
            return validator.parse(value)
        if isinstance(validator, type):
            return msgspec.convert(value, validator)
        return validator(value)


def _copy_literal(value: Any) -> Any:
    # Literals are shared by every run of the graph: hand out copies of mutable ones.
    if isinstance(value, dict):
        return {k: _copy_literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_literal(v) for v in value]
    return value


class WhenBlock(msgspec.Struct, frozen=True):
    """A ``when(values, predicate)`` block; its steps run only when the predicate holds."""

    name: str
    values: Expr
    predicate: Any


class Node(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a workflow graph.

    ``kind`` is ``"step"`` (run by a step executor), ``"hook"`` (the point where a hook's
    payload is published; its handlers are ``"step"`` nodes after it) or ``"subflow"`` (a
    nested workflow run as its own transaction).
    """

    name: str
    kind: str = "step"
    after: tuple[str, ...] = ()
    input: Expr = Lit(None)
    config: StepConfig = StepConfig()
    blocks: tuple[str, ...] = ()
    workflow: str | None = None
    hook: str | None = None


class Graph:
    """A compiled workflow: nodes in composition order plus what the coordinator derives."""

    __slots__ = (
        "async_nodes",
        "definition_hash",
        "has_async",
        "hook_handlers",
        "idempotent",
        "index",
        "name",
        "nodes",
        "result",
        "retention",
        "successors",
        "timeout",
        "whens",
    )

    def __init__(
        self,
        name: str,
        nodes: tuple[Node, ...],
        whens: Mapping[str, WhenBlock],
        result: Expr,
        hook_handlers: Mapping[str, tuple[str, ...]],
        *,
        idempotent: bool = False,
        retention: float | None = None,
        timeout: float | None = None,
        async_children: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        self.nodes = nodes
        self.index = {n.name: n for n in nodes}
        self.whens = dict(whens)
        self.result = result
        self.hook_handlers = dict(hook_handlers)
        self.idempotent = idempotent
        self.retention = retention
        self.timeout = timeout
        # Every step that (transitively) runs after a node: compensation waits for all of them.
        succ: dict[str, set[str]] = {n.name: set() for n in nodes}
        for node in reversed(nodes):
            for pred in node.after:
                succ[pred].add(node.name)
                succ[pred] |= succ[node.name]
        self.successors = {k: frozenset(v) for k, v in succ.items()}
        # Steps whose completion comes later (async, or a nested workflow that has async steps).
        self.async_nodes = frozenset(
            n.name
            for n in nodes
            if n.config.async_ or (n.kind == "subflow" and n.workflow in async_children)
        )
        self.has_async = bool(self.async_nodes) or any(n.config.compensate_async for n in nodes)
        """True when some step completes later (the workflow is long-running)."""
        self.definition_hash = _hash(self)


def _describe(obj: Any) -> Any:
    if callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    raise NotImplementedError(type(obj))


_hash_encoder = msgspec.json.Encoder(enc_hook=_describe, order="sorted")


def _hash(graph: Graph) -> str:
    payload = {
        "name": graph.name,
        "nodes": graph.nodes,
        "whens": graph.whens,
        "result": graph.result,
        "hooks": graph.hook_handlers,
    }
    try:
        raw = _hash_encoder.encode(payload)
    except (TypeError, NotImplementedError):  # an odd literal: fall back to its repr
        raw = repr(payload).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def check_encodable(value: Any, what: str, encode: Callable[[Any], bytes]) -> None:
    """Raise ``TypeError`` naming ``what`` when ``value`` cannot be encoded."""
    try:
        encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"{what} cannot be encoded: {exc}") from None
