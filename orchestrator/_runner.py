"""How the services' processes run their event loop: uvloop when it is installed."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["loop_options"]


def loop_options() -> dict[str, Any]:
    """``anyio.run``'s backend options for a service process (and the command line).

    uvloop (``pip install 'orchestrator[uvloop]'``) when it is importable, since a service spends
    much of its time in the event loop and its socket calls: on workload (a) over NATS, one
    workflow at a time, a p50 about an eighth lower (README). ``ORCH_UVLOOP=0`` keeps asyncio's
    own loop; ``ORCH_UVLOOP=1`` insists on uvloop (an error if it is missing).
    """
    wanted = os.environ.get("ORCH_UVLOOP", "").strip().lower()
    if wanted in ("0", "false", "no", "off"):
        return {}
    if wanted in ("1", "true", "yes", "on") or importlib.util.find_spec("uvloop") is not None:
        return {"use_uvloop": True}
    return {}
