"""Container health check: can this container reach NATS, and does the service answer there?

    python /app/healthcheck.py [SERVICE] [--timeout SECONDS]

Connects to NATS with the container's own settings (the ``ORCH_*`` environment variables the
``orchestrator`` services read) and sends a service-discovery ping, ``$SRV.PING.<SERVICE>``
(``orch-coordinator`` by default; ``orch-worker`` for workers). Exit status: 0 when an
instance answered, 1 when none did, 2 when NATS could not be reached or refused the
credentials. It is a stop-gap until the ``orchestrator`` command line has a health check of its
own: the ping is answered by *any* instance of the service, so it proves that the container can
reach NATS with its credentials and that the service is up in the deployment, not that this
very process is responsive (see deploy/README.md, "Health checks").

Only the standard library and nats-py (a dependency of the orchestrator) are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import nats
import nats.errors

OK, NO_ANSWER, NO_CONNECTION = 0, 1, 2


def connect_options(env: dict[str, str], timeout: float) -> dict[str, Any]:
    """nats-py ``connect`` options from the ``ORCH_*`` variables (as the services read them)."""
    servers = [s.strip() for s in env.get("ORCH_SERVERS", "").split(",") if s.strip()]
    options: dict[str, Any] = {
        "servers": servers or ["nats://127.0.0.1:4222"],
        "name": "orchestrator-healthcheck",
        "connect_timeout": timeout,
        "allow_reconnect": False,
        "max_reconnect_attempts": 0,
    }
    if env.get("ORCH_USER"):
        options["user"] = env["ORCH_USER"]
        options["password"] = env.get("ORCH_PASSWORD", "")
    if env.get("ORCH_TOKEN"):
        options["token"] = env["ORCH_TOKEN"]
    if env.get("ORCH_CREDS"):
        options["user_credentials"] = env["ORCH_CREDS"]
    seed = env.get("ORCH_NKEY_SEED")
    if seed:
        # A path to a seed file, or the seed itself (``SU...``).
        if Path(seed).is_file():
            options["nkeys_seed"] = seed
        else:
            options["nkeys_seed_str"] = seed
    ca, cert, key = env.get("ORCH_TLS_CA"), env.get("ORCH_TLS_CERT"), env.get("ORCH_TLS_KEY")
    if ca or cert:
        context = ssl.create_default_context(cafile=ca or None)
        if cert:
            context.load_cert_chain(cert, key or None)
        options["tls"] = context
    return options


async def check(service: str, timeout: float, env: dict[str, str]) -> int:
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error) or type(error).__name__)

    try:
        nc = await nats.connect(error_cb=on_error, **connect_options(env, timeout))
    except Exception as error:
        detail = "; ".join(errors) or str(error) or type(error).__name__
        print(f"unhealthy: cannot connect to NATS: {detail}", file=sys.stderr)
        return NO_CONNECTION
    try:
        reply = await nc.request(f"$SRV.PING.{service}", b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        print(f"unhealthy: no instance of {service!r} answers $SRV.PING", file=sys.stderr)
        return NO_ANSWER
    except nats.errors.TimeoutError:
        detail = f" ({'; '.join(errors)})" if errors else ""
        print(f"unhealthy: no answer from {service!r} within {timeout} s{detail}", file=sys.stderr)
        return NO_ANSWER
    finally:
        await nc.close()
    try:
        instance = json.loads(reply.data).get("id", "?")
    except (ValueError, AttributeError):
        instance = "?"
    print(f"healthy: {service} instance {instance} answered")
    return OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("service", nargs="?", default="orch-coordinator")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    return asyncio.run(check(args.service, args.timeout, dict(os.environ)))


if __name__ == "__main__":
    sys.exit(main())
