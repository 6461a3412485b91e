"""What our own tests use, for users' tests: engines and log capture.

```python
from orchestrator.testing import local_engine, capture_logs

async def test_checkout():
    async with local_engine([checkout], container={"inventory": FakeInventory()}) as engine:
        result = await engine.run(checkout, {"items": [...]})
```
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from structlog.testing import capture_logs as capture_logs

from ._composer import Workflow
from ._local import LocalEngine

__all__ = ["capture_logs", "local_engine"]


@contextlib.asynccontextmanager
async def local_engine(
    workflows: Iterable[Workflow], container: Any = None, **options: Any
) -> AsyncIterator[LocalEngine]:
    """A running :class:`LocalEngine` for the duration of the ``async with`` block."""
    async with LocalEngine(workflows, container, **options) as engine:
        yield engine
