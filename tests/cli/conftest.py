"""Fixtures for the command-line tests: a CLI runner, run from the repository root."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio."""
    return "asyncio"


@pytest.fixture
def runner() -> CliRunner:
    """A runner with a wide terminal, so tables never wrap what the tests look for."""
    return CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test from the repository root, and undo the CLI's ``sys.path`` insertion."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
