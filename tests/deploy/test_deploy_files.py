"""The deployment files of ``deploy/``, checked without Docker or Kubernetes.

They parse, they are structurally sane (services, images, commands, env, probes, volumes), what
they reference exists (files, Secret keys, ConfigMaps, variables), the commands they run exist in
our command line, the Dockerfile is multi-stage with a non-root user, and the NATS
configurations pass ``nats-server -t``. The permission blocks of ``nats.conf`` are exercised on a
real server in ``test_deploy_nats.py``.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import Workflow
from transport._nats_server import find_nats_server

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
NODES = ("nats-1", "nats-2", "nats-3")
APP = "examples.shop"
ROLES = {"coordinator": "orch-coordinator", "worker": "orch-worker"}
"""The orchestrator commands the files run, and the service name each one's probe pings."""
CLI_TIMEOUT = 60.0


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[Any]]:
    """Every manifest of the kustomization, by file name."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {name: load_yaml_docs(K8S / name) for name in kustomization["resources"]}


def k8s_objects(manifests: dict[str, list[Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for docs in manifests.values() for doc in docs if doc["kind"] == kind]


def orchestrator_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if name not in NODES}


def config_variables(text: str) -> set[str]:
    """``$NAME`` references of a nats-server configuration, minus those the file defines."""
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    body = re.sub(r'"[^"]*"', '""', body)  # subjects such as "$JS.API.>" are no variables
    used = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", body))
    defined = set(re.findall(r"(?m)^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[=:]", body))
    return used - defined


def nats_environment(compose: dict[str, Any]) -> dict[str, str]:
    """The environment compose gives the NATS nodes, with ``${VAR:-default}`` resolved."""
    env = compose["services"]["nats-1"]["environment"]
    return {k: resolve_defaults(str(v)) for k, v in env.items()}


def resolve_defaults(value: str) -> str:
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


# --------------------------------------------------------------------------------- compose
def test_compose_runs_a_three_node_nats_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for index, node in enumerate(NODES, start=1):
        service = services[node]
        image = service["image"]
        assert image.startswith("nats:2.12"), image
        assert service["command"] == ["--config", f"/etc/nats/node/{node}.conf"]
        mounts = {v.split(":")[0]: v.split(":")[1] for v in service["volumes"]}
        assert mounts["./nats.conf"] == "/etc/nats/nats.conf"
        assert mounts[f"./nats/{node}.conf"] == f"/etc/nats/node/{node}.conf"
        assert mounts[f"{node}-data"] == "/data"  # nats.conf's store_dir is /data/jetstream
        assert f"{node}-data" in compose["volumes"]
        assert (DEPLOY / "nats" / f"{node}.conf").is_file()
        assert service["restart"] in ("always", "unless-stopped")
        assert "8222/healthz" in " ".join(service["healthcheck"]["test"])
        assert service["environment"][f"NATS_ROUTE_{index}"].endswith(f"@{node}:6222")


def test_compose_gives_the_nodes_every_variable_their_configs_read(
    compose: dict[str, Any],
) -> None:
    needed = config_variables((DEPLOY / "nats.conf").read_text())
    for node in NODES:
        needed |= config_variables((DEPLOY / "nats" / f"{node}.conf").read_text())
    assert {"ORCH_COORDINATOR_PASSWORD", "ORCH_WORKER_PASSWORD", "NATS_CLUSTER_PASSWORD"} <= needed
    for node in NODES:
        assert needed <= set(compose["services"][node]["environment"]), node
    # Development defaults are marked as such, and nothing else is baked in.
    for key, value in compose["services"]["nats-1"]["environment"].items():
        if "PASSWORD" in key:
            assert re.fullmatch(rf"\$\{{{key}:-dev-[a-z-]+\}}", value), (key, value)


def test_compose_runs_coordinators_and_workers_of_the_example_app(
    compose: dict[str, Any],
) -> None:
    services = orchestrator_services(compose)
    by_role: dict[str, list[str]] = {}
    for name, service in services.items():
        command = service["command"]
        role = command[0]
        assert role in ROLES, (name, command)
        assert command[1] == APP
        by_role.setdefault(role, []).append(name)

        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        )
        assert service["restart"] in ("always", "unless-stopped")
        for node in NODES:
            assert service["depends_on"][node]["condition"] == "service_healthy"

        env = service["environment"]
        servers = env["ORCH_SERVERS"].split(",")
        assert servers == [f"nats://{node}:4222" for node in NODES]
        assert env["ORCH_PREFIX"] == "orch"  # nats.conf's permissions are written for it
        assert int(env["ORCH_PARTITIONS"]) >= 1
        assert env["ORCH_USER"] == role
        password_var = f"ORCH_{role.upper()}_PASSWORD"
        assert env["ORCH_PASSWORD"].startswith(f"${{{password_var}:-"), env["ORCH_PASSWORD"]
        # ... and the same default as the NATS side, or the service could not log in.
        assert resolve_defaults(env["ORCH_PASSWORD"]) == nats_environment(compose)[password_var]

        check = service["healthcheck"]["test"]
        assert check == ["CMD", "python", "/app/healthcheck.py", ROLES[role]]

    main = {name: services[name] for name in ("coordinator", "worker")}
    assert all(s["deploy"]["replicas"] >= 2 for s in main.values())
    assert "profiles" not in main["coordinator"]
    assert "profiles" not in main["worker"]


# ------------------------------------------------------------------------------- nats.conf
def test_nats_conf_makes_jetstream_durable_and_defines_the_roles() -> None:
    text = (DEPLOY / "nats.conf").read_text()
    jetstream = re.search(r"(?ms)^jetstream \{(.*?)^\}", text)
    assert jetstream is not None
    assert re.search(r"(?m)^\s*sync_interval: always\s*$", jetstream.group(1))
    assert re.search(r"(?m)^\s*store_dir: /data/jetstream\s*$", jetstream.group(1))
    for role in ("coordinator", "worker", "client"):
        assert re.search(
            rf"\{{ user: {role}, password: \$ORCH_{role.upper()}_PASSWORD, "
            rf"permissions: \${role.upper()}_PERMISSIONS \}}",
            text,
        ), role
    # No password is written into the file.
    assert not re.search(r"password:\s*[\"']?[^\s$\"']", text)


def nats_env(compose: dict[str, Any]) -> dict[str, str]:
    return {**os.environ, **nats_environment(compose)}


@pytest.mark.parametrize("config", ["nats.conf", *(f"nats/{node}.conf" for node in NODES)])
def test_nats_server_accepts_the_configuration(config: str, compose: dict[str, Any]) -> None:
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", config],
        cwd=DEPLOY,
        env=nats_env(compose),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("node", NODES)
def test_each_node_config_names_itself_and_routes_to_the_others(node: str) -> None:
    text = (DEPLOY / "nats" / f"{node}.conf").read_text()
    assert re.search(r'(?m)^include "\.\./nats\.conf"$', text)
    assert re.search(rf"(?m)^server_name: {node}$", text)
    routes = re.search(r"(?s)routes: \[(.*?)\]", text)
    assert routes is not None
    others = {f"$NATS_ROUTE_{n[-1]}" for n in NODES if n != node}
    assert set(routes.group(1).split()) == others
    assert "password: $NATS_CLUSTER_PASSWORD" in text


# -------------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_is_multi_stage_slim_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    stages = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(stages) >= 2, stages
    assert re.fullmatch(r"\S+ AS build", stages[0], re.IGNORECASE)
    final_image = stages[-1].split()[0]
    final_image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final_image)
    assert final_image == "python:3.11-slim"

    last = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    final = instructions[last:]
    users = [rest for kw, rest in final if kw == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert ("ENTRYPOINT", '["orchestrator"]') in final
    # The wheel is built in the first stage and installed, without an index, in the last.
    assert any(kw == "RUN" and "pip wheel" in rest for kw, rest in instructions[:last])
    installs = [rest for kw, rest in final if kw == "RUN" and "pip install" in rest]
    assert installs
    assert "--no-index" in installs[0]
    assert "from=build" in installs[0]
    copies = [rest for kw, rest in final if kw == "COPY"]
    assert "examples ./examples" in copies
    assert "deploy/healthcheck.py ./healthcheck.py" in copies
    assert ("WORKDIR", "/app") in final  # ./healthcheck.py is /app/healthcheck.py


def test_dockerfile_user_is_the_one_kubernetes_expects(manifests: dict[str, list[Any]]) -> None:
    instructions = dockerfile_instructions()
    user = [rest for kw, rest in instructions if kw == "USER"][-1]
    uid, _, gid = user.partition(":")
    for deployment in k8s_objects(manifests, "Deployment"):
        context = deployment["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True
        assert str(context["runAsUser"]) == uid
        assert str(context["runAsGroup"]) == gid


def test_dockerfile_copies_what_the_package_needs_and_bakes_in_no_secrets() -> None:
    instructions = dockerfile_instructions()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ignored = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for keyword, rest in instructions:
        if keyword == "COPY" and "--from" not in rest:
            sources += [s.rstrip("/") for s in shlex.split(rest)[:-1] if not s.startswith("--")]
    for source in sources:
        assert (REPO / source).exists(), source  # the build context is the repository root
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= set(sources)
    for keyword, rest in instructions:
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"PASSWORD|TOKEN|SECRET|NKEY|CREDS", rest, re.IGNORECASE), rest


# -------------------------------------------------------------------------------- Kubernetes
def test_kustomization_lists_every_manifest_and_each_one_parses(
    manifests: dict[str, list[Any]],
) -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(manifests) == on_disk
    for name, docs in manifests.items():
        assert docs, name
        for doc in docs:
            assert doc["apiVersion"], name
            assert doc["kind"], name
            assert doc["metadata"]["name"], name
    kinds = {doc["kind"] for docs in manifests.values() for doc in docs}
    assert {"Deployment", "ConfigMap", "Secret"} <= kinds
    # No NATS server here: that is the official Helm chart's job.
    assert "StatefulSet" not in kinds
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert [image["name"] for image in kustomization["images"]] == ["orchestrator"]


def test_deployments_run_the_services_with_their_settings_and_probes(
    manifests: dict[str, list[Any]],
) -> None:
    config_maps = {c["metadata"]["name"]: c for c in k8s_objects(manifests, "ConfigMap")}
    secrets = {s["metadata"]["name"]: s for s in k8s_objects(manifests, "Secret")}
    accounts = {a["metadata"]["name"] for a in k8s_objects(manifests, "ServiceAccount")}
    deployments = k8s_objects(manifests, "Deployment")
    roles = set()
    for deployment in deployments:
        spec = deployment["spec"]
        assert spec["replicas"] >= 2
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        pod = spec["template"]["spec"]
        assert pod["serviceAccountName"] in accounts
        (container,) = pod["containers"]
        assert container["image"] == "orchestrator"  # set by the kustomization's `images`
        role, app = container["args"][:2]
        assert role in ROLES
        assert app == APP
        roles.add(role)

        (source,) = container["envFrom"]
        settings = config_maps[source["configMapRef"]["name"]]["data"]
        assert len(settings["ORCH_SERVERS"].split(",")) >= 3
        assert settings["ORCH_PREFIX"] == "orch"
        int(settings["ORCH_PARTITIONS"])
        env = {e["name"]: e for e in container["env"]}
        assert env["ORCH_USER"]["value"] == role
        ref = env["ORCH_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == f"{role}-password"
        assert ref["key"] in secrets[ref["name"]]["stringData"]

        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command == ["python", "/app/healthcheck.py", ROLES[role]], probe
            assert container[probe]["timeoutSeconds"] >= 3
    assert roles == set(ROLES)
    for budget in k8s_objects(manifests, "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments
        )


def test_the_secret_is_a_template() -> None:
    (secret,) = load_yaml_docs(K8S / "secret.yaml")
    assert all(value.startswith("CHANGE-ME") for value in secret["stringData"].values())


# ------------------------------------------------------------------------ our command line
def used_commands() -> dict[str, set[str]]:
    """Each ``orchestrator`` command the files run, with the options they pass it."""
    commands: list[list[str]] = []
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    commands += [s["command"] for s in orchestrator_services(compose).values()]
    for path in K8S.glob("*.yaml"):
        for doc in load_yaml_docs(path):
            if doc.get("kind") == "Deployment":
                commands += [c["args"] for c in doc["spec"]["template"]["spec"]["containers"]]
    used: dict[str, set[str]] = {}
    for command in commands:
        used.setdefault(command[0], set()).update(a for a in command if a.startswith("--"))
    return used


def cli_commands() -> set[str] | None:
    """The commands the CLI has now (``None`` if it does not import)."""
    try:
        from orchestrator.cli import app
    except Exception:
        return None
    names = {
        c.name or (c.callback.__name__.replace("_", "-") if c.callback else "")
        for c in app.registered_commands
    }
    return names | {g.name for g in app.registered_groups if g.name}


def command_params() -> list[Any]:
    have = cli_commands()
    params = []
    for command, options in sorted(used_commands().items()):
        marks = []
        if have is not None and command not in have:
            marks.append(
                pytest.mark.xfail(
                    strict=False,
                    reason=f"`orchestrator {command}` is not in the CLI yet (being added)",
                )
            )
        params.append(pytest.param(command, sorted(options), marks=marks, id=command))
    return params


def orchestrator_command() -> list[str]:
    script = Path(sys.executable).parent / "orchestrator"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orchestrator.cli"]


def test_the_files_run_the_expected_commands() -> None:
    assert set(used_commands()) == set(ROLES)


@pytest.mark.parametrize(("command", "options"), command_params())
def test_every_command_the_files_run_exists(command: str, options: list[str]) -> None:
    result = subprocess.run(
        [*orchestrator_command(), command, "--help"],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for option in options:
        assert option in result.stdout, f"`orchestrator {command}` has no {option}"


def test_the_app_the_files_run_has_workflows_and_a_container() -> None:
    module = importlib.import_module(APP)
    assert isinstance(module.checkout, Workflow)
    assert callable(module.make_container)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not found")
def test_kustomize_builds_the_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    for doc in built:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "orchestrator"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"]
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            assert container["image"] == f"{image['newName']}:{image['newTag']}"
    assert sum(doc["kind"] == "Deployment" for doc in built) == 2


# ---------------------------------------------------------------------------------- README
def test_the_readme_covers_every_file_and_the_durability_notes() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name not in ("README.md", ".gitignore", ".env"):
            if "__pycache__" in path.parts:
                continue
            relative = path.relative_to(DEPLOY)
            name = relative.parts[0] if relative.parts[0] in ("k8s", "nats") else path.name
            assert name in readme, relative
    for note in ("sync_interval: always", "Jepsen", "2.12.1", "--step", "Helm chart"):
        assert note in readme, note
