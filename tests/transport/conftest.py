"""Fixtures shared by the transport tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio (the backend the services use)."""
    return "asyncio"
