"""``python -m examples`` runs every demo and exits 0 when each ended as expected."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from rich.console import Console

from examples import approval, shop
from examples.__main__ import Demo

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_python_m_examples_exits_0() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "120", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "expectations held" in out
    assert "FAILED" not in out
    assert "state reverted" in out
    assert "compensations ran for: create-order, charge-payment, reserve-inventory" in out
    assert "state invoking" in out
    assert "approval:change-42:await-approval:invoke" in out
    assert "Traceback" not in out + proc.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("demo", [shop.demo, approval.demo], ids=["shop", "approval"])
async def test_each_demo_meets_its_expectations(demo: Demo) -> None:
    console = Console(file=io.StringIO(), width=120)
    with anyio.fail_after(10):
        checks = await demo(console)
    assert checks
    assert [text for text, held in checks if not held] == []
