"""What the command line loads, and how it reaches NATS.

An *app* is what a service serves: workflows, and the container their steps resolve services
from. The command line names it ``MODULE`` (every workflow in the module, and its
``make_container()`` or ``container``) or ``MODULE:ATTR`` (a workflow, a list of workflows, or an
object with ``workflows`` and optionally ``container`` / ``make_container``). Modules are imported
with the current directory on ``sys.path``.

:class:`NatsOptions` turns the connection flags (servers, credentials, TLS files, prefix) into
nats-py's ``connect`` options, checking each one first so a bad value is one clear line.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import ssl
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from actors import Subjects

from ._composer import Workflow
from ._errors import ConfigurationError
from .services import collect_workflows

__all__ = [
    "DEFAULT_SERVERS",
    "App",
    "CliError",
    "NatsOptions",
    "describe_exc",
    "load_app",
    "load_container",
    "load_workflow",
    "parse_json",
]

DEFAULT_SERVERS = "nats://127.0.0.1:4222"
_SCHEMES = ("nats", "tls", "ws", "wss")


class CliError(Exception):
    """Bad input to a command: reported on one line, exit code 2."""


# ------------------------------------------------------------------------------ modules
def _import_module(name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise CliError(
                f"cannot import module {name!r}: no module named {missing!r} "
                f"(searched the current directory {cwd} and sys.path)"
            ) from None
        raise CliError(f"importing module {name!r} failed: {describe_exc(exc)}") from None
    except Exception as exc:
        raise CliError(f"importing module {name!r} failed: {describe_exc(exc)}") from None


def describe_exc(exc: BaseException) -> str:
    """``Type: message (at file:line)``, where the line is the innermost frame."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" (at {exc.filename}:{exc.lineno})"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _split_spec(spec: str, what: str) -> tuple[str, str | None]:
    module, sep, attr = spec.strip().partition(":")
    if not module or (sep and not attr):
        raise CliError(f"{what} must look like MODULE:ATTRIBUTE (e.g. examples.shop:checkout)")
    return module, attr or None


def _lookup(module: ModuleType, path: str) -> Any:
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _workflows_in(module: ModuleType) -> dict[str, Workflow]:
    return {k: v for k, v in vars(module).items() if isinstance(v, Workflow)}


def load_workflow(spec: str) -> Workflow:
    """The workflow named by ``MODULE:WORKFLOW`` (``MODULE`` alone when it has exactly one).

    ``WORKFLOW`` is an attribute path in the module, or the name given to ``create_workflow``.
    """
    module_name, attr = _split_spec(spec, "the workflow")
    module = _import_module(module_name)
    found = _workflows_in(module)
    listing = ", ".join(sorted(found)) or "none"
    if attr is None:
        if len(found) == 1:
            return next(iter(found.values()))
        raise CliError(
            f"module {module_name!r} defines {len(found)} workflows ({listing}); "
            f"name one: {module_name}:WORKFLOW"
        )
    try:
        value = _lookup(module, attr)
    except AttributeError:
        by_name = [wf for wf in found.values() if wf.name == attr]
        if len(by_name) == 1:
            return by_name[0]
        raise CliError(
            f"module {module_name!r} has no attribute {attr!r}; workflows in it: {listing}"
        ) from None
    if not isinstance(value, Workflow):
        raise CliError(
            f"{module_name}:{attr} is a {type(value).__name__}, not a workflow "
            f"(made by create_workflow); workflows in {module_name!r}: {listing}"
        )
    return value


# ------------------------------------------------------------------------------ containers
def _is_container(value: Any) -> bool:
    return isinstance(value, Mapping) or hasattr(value, "resolve")


async def _resolve_container(value: Any, where: str) -> Any:
    """A container as is; any other callable is a factory, called (and awaited if need be)."""
    if not _is_container(value) and callable(value):
        try:
            value = value()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise CliError(f"the container factory {where} failed: {describe_exc(exc)}") from None
    if value is not None and not _is_container(value):
        raise CliError(
            f"{where} ({type(value).__name__}) is not a container: a container is a mapping, "
            "has a resolve(name) method, or is a factory that returns one"
        )
    return value


def _container_of(owner: Any, where: str) -> tuple[Any, str] | None:
    """``owner``'s ``make_container`` factory, else its ``container``; ``None`` for neither."""
    if callable(getattr(owner, "make_container", None)):
        return owner.make_container, f"{where}:make_container"
    if hasattr(owner, "container"):
        return owner.container, f"{where}:container"
    return None


def _container_spec(spec: str) -> tuple[Any, str]:
    """The value named by ``--container MODULE:ATTR`` (a container or a factory)."""
    module_name, attr = _split_spec(spec, "--container")
    if attr is None:
        raise CliError("--container must look like MODULE:ATTRIBUTE")
    module = _import_module(module_name)
    try:
        return _lookup(module, attr), f"{module_name}:{attr}"
    except AttributeError:
        raise CliError(f"--container: module {module_name!r} has no attribute {attr!r}") from None


async def load_container(workflow_module: str, spec: str | None) -> Any:
    """The container for a run: ``--container MODULE:ATTR``, else the workflow's module's.

    An attribute that is a mapping or has ``resolve(name)`` is used as is; any other callable is
    a factory, called (and awaited when it returns an awaitable). Without ``--container`` the
    module's ``make_container()`` factory wins over its ``container`` attribute; neither means
    an empty container.
    """
    if spec is not None:
        return await _resolve_container(*_container_spec(spec))
    found = _container_of(_import_module(workflow_module), workflow_module)
    return None if found is None else await _resolve_container(*found)


# ------------------------------------------------------------------------------ apps
@dataclass(frozen=True, kw_only=True)
class App:
    """The workflows a service serves, and where its container comes from."""

    spec: str
    """What the command line named, e.g. ``examples.shop`` or ``myapp:workflows``."""
    workflows: tuple[Workflow, ...]
    container_source: tuple[Any, str] | None = None
    """The container or its factory, with where it was found; ``None``: no container."""

    @property
    def names(self) -> list[str]:
        """The workflows' names, sorted."""
        return sorted(wf.name for wf in self.workflows)

    async def container(self, spec: str | None = None) -> Any:
        """The container for a worker: ``--container MODULE:ATTR`` when given, else the app's."""
        if spec is not None:
            return await _resolve_container(*_container_spec(spec))
        if self.container_source is None:
            return None
        return await _resolve_container(*self.container_source)


def _workflow_list(value: Any, where: str) -> tuple[Workflow, ...]:
    if isinstance(value, Workflow):
        return (value,)
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        for item in items:
            if not isinstance(item, Workflow):
                raise CliError(
                    f"{where} holds {item!r:.60} ({type(item).__name__}), not a workflow "
                    "(made by create_workflow)"
                )
        return tuple(items)
    raise CliError(
        f"{where} is a {type(value).__name__}: expected a workflow, a list of workflows, or an "
        "object with a `workflows` attribute"
    )


def load_app(spec: str) -> App:
    """The app named by ``MODULE`` or ``MODULE:ATTR`` (see the module's docstring)."""
    module_name, attr = _split_spec(spec, "the app")
    module = _import_module(module_name)
    if attr is None:
        workflows = tuple(_workflows_in(module).values())
        where = module_name
        source = _container_of(module, module_name)
    else:
        try:
            value = _lookup(module, attr)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
        where = f"{module_name}:{attr}"
        if not isinstance(value, Workflow | list | tuple) and hasattr(value, "workflows"):
            workflows = _workflow_list(value.workflows, f"{where}.workflows")
            source = _container_of(value, where)
        else:
            workflows = _workflow_list(value, where)
            source = _container_of(module, module_name)
    workflows = tuple({id(wf): wf for wf in workflows}.values())  # an alias is no second one
    if not workflows:
        raise CliError(f"{where} has no workflows (objects made by create_workflow)")
    try:
        collect_workflows(workflows)  # two different workflows with one name, nested included
    except ConfigurationError as exc:
        raise CliError(f"{where}: {exc}") from None
    return App(spec=spec, workflows=workflows, container_source=source)


# ------------------------------------------------------------------------------ JSON
def parse_json(text: str, option: str) -> Any:
    """A JSON option's value: the text itself, ``@FILE`` for a file's, ``-`` for stdin's."""
    source = text
    if text == "-":
        source = sys.stdin.read()
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{option}: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        raise CliError(f"{option} is not valid JSON: {exc}") from None


# ------------------------------------------------------------------------------ NATS
def _servers(text: str) -> tuple[str, ...]:
    urls = tuple(url.strip() for url in text.split(",") if url.strip())
    if not urls:
        raise CliError("--servers: give at least one NATS URL, e.g. nats://127.0.0.1:4222")
    checked = []
    for url in urls:
        full = url if "://" in url else f"nats://{url}"
        parts = urlsplit(full)
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise CliError(f"--servers: {url!r} has an invalid port") from None
        if parts.scheme not in _SCHEMES or not parts.hostname:
            raise CliError(
                f"--servers: {url!r} is not a NATS URL (like nats://host:4222; "
                f"schemes: {', '.join(_SCHEMES)})"
            )
        checked.append(full)
    return tuple(checked)


def _readable(option: str, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise CliError(f"{option}: no such file {value!r}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CliError(f"{option}: cannot read {value!r}: {exc.strerror}") from None
    return str(path)


def _tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None and ca is None:
        return None
    if key is not None and cert is None:
        raise CliError("--tls-key needs --tls-cert (the client certificate it belongs to)")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise CliError(f"--tls-ca: {ca!r} is not a CA certificate file: {exc}") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise CliError(
                f"--tls-cert/--tls-key: cannot load the client certificate {cert!r}"
                f"{'' if key is None else f' with the key {key!r}'}: {exc}"
            ) from None
    return context


def _needs_nkeys(option: str) -> None:
    # nats-py signs with the nkeys package, an optional dependency it imports only when
    # connecting: without this check the error would come from deep inside the connection.
    if importlib.util.find_spec("nkeys") is None:
        raise CliError(f"{option} needs the nkeys package: pip install 'orchestrator[nkeys]'")


@dataclass(frozen=True, kw_only=True)
class NatsOptions:
    """Checked connection settings: where NATS is, how to log in, and the deployment prefix."""

    servers: tuple[str, ...] = (DEFAULT_SERVERS,)
    """The server URLs (a cluster's seed list)."""
    prefix: str = "orch"
    """The subject and stream prefix shared by the deployment's services and clients."""
    partitions: int = 16
    """Transaction partitions: the same number for every service of a deployment."""
    connect_timeout: float | None = None
    """Seconds to keep trying to reach NATS at first; ``None``: nats-py's retry policy."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for nats-py's ``connect`` (credentials, TLS)."""

    @classmethod
    def parse(
        cls,
        *,
        servers: str = DEFAULT_SERVERS,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds: str | None = None,
        nkey_seed: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        prefix: str = "orch",
        partitions: int = 16,
        connect_timeout: float | None = None,
    ) -> NatsOptions:
        """Check the flags' values; a bad one raises :class:`CliError` saying which and why."""
        try:
            Subjects(prefix, partitions)
        except ValueError as exc:
            option = "--prefix" if "prefix" in str(exc) else "--partitions"
            raise CliError(f"{option}: {exc}") from None
        if password is not None and user is None:
            raise CliError("--password needs --user")
        if token is not None and (user is not None or password is not None):
            raise CliError("--token and --user/--password are two ways to log in: use one")
        if creds is not None and nkey_seed is not None:
            raise CliError("--creds and --nkey-seed are two ways to log in: use one")
        options: dict[str, Any] = {}
        if user is not None:
            options["user"] = user
        if password is not None:
            options["password"] = password
        if token is not None:
            options["token"] = token
        if creds is not None:
            options["user_credentials"] = _readable("--creds", creds)
            _needs_nkeys("--creds")
        if nkey_seed is not None:
            options["nkeys_seed"] = _readable("--nkey-seed", nkey_seed)
            _needs_nkeys("--nkey-seed")
        tls = _tls_context(
            _readable("--tls-cert", tls_cert),
            _readable("--tls-key", tls_key),
            _readable("--tls-ca", tls_ca),
        )
        if tls is not None:
            options["tls"] = tls
        if connect_timeout is not None and connect_timeout <= 0:
            raise CliError("--connect-timeout must be more than 0 seconds")
        return cls(
            servers=_servers(servers),
            prefix=prefix,
            partitions=partitions,
            connect_timeout=connect_timeout,
            options=options,
        )

    @property
    def server_list(self) -> list[str]:
        """The servers, as nats-py takes them."""
        return list(self.servers)
