"""Run every example in local mode: ``python -m examples`` (exit code 0 when all went as expected).

1. a checkout that succeeds;
2. a checkout that fails at ``create-order`` and is compensated (refund, stock released);
3. an approval that waits on an async step, approved, and one that is rejected.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable

import anyio
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from examples import approval, shop

Demo = Callable[[Console], Awaitable[list[tuple[str, bool]]]]

DEMOS: list[tuple[str, Demo]] = [
    ("shop checkout (examples.shop:checkout)", shop.demo),
    ("approval (examples.approval:approval)", approval.demo),
]


async def run_demos(console: Console) -> list[tuple[str, bool]]:
    """Run the demos one after the other; every expectation with whether it held."""
    checks: list[tuple[str, bool]] = []
    for title, demo in DEMOS:
        console.rule(Text(title, style="bold"))
        checks.extend(await demo(console))
        console.print()
    return checks


def main() -> int:
    """Run the demos and print a summary; 0 when every expectation held, else 1."""
    console = Console()
    started = time.perf_counter()
    checks = anyio.run(run_demos, console)
    elapsed = time.perf_counter() - started
    summary = Table(
        title="expectations",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    summary.add_column("")
    summary.add_column("expectation")
    for text, held in checks:
        summary.add_row(
            Text("ok", style="green") if held else Text("FAILED", style="bold red"), text
        )
    console.rule(Text("summary", style="bold"))
    console.print(summary)
    failed = [text for text, held in checks if not held]
    if failed:
        console.print(Text(f"{len(failed)} of {len(checks)} expectations failed", style="bold red"))
        return 1
    console.print(
        Text(f"all {len(checks)} expectations held ({elapsed:.2f} s)", style="bold green")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
