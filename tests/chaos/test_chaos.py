"""The short chaos run (about a minute), part of ``make test``; ``make chaos`` runs the full one
(2,000 workflows, and the same on a three-node cluster): see ``harness.py``.

250 workflows on a nats-server with file storage and ``sync_interval: always``, two
coordinators and three workers, while a worker is killed (SIGKILL) every ~2 s, a coordinator
every ~5 s and the nats-server twice, each restarted at once. Every check of ``check.py`` must
hold; the report is printed either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import ChaosConfig, run_chaos

pytestmark = [pytest.mark.anyio, pytest.mark.chaos, pytest.mark.nats]


async def test_chaos_short_run_keeps_every_guarantee(tmp_path: Path) -> None:
    config = ChaosConfig(
        workflows=250,
        duration=25.0,
        settle_timeout=30.0,
        workdir=tmp_path,
    )
    report = await run_chaos(config)
    print(report.render())
    assert report.ok, f"checks failed: {report.failed()}\n{report.render()}"
