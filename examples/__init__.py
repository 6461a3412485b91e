"""Example workflows, runnable with ``python -m examples`` (or ``make run``).

- :mod:`examples.shop`: a checkout saga (``checkout``) over in-memory inventory, payments,
  orders, notifications and loyalty services, with failures injected from the input.
- :mod:`examples.approval`: a long-running approval (``approval``) that waits on an async step
  until a reviewer answers with ``engine.set_step_success``.

Both also run from the command line, e.g. ``orchestrator run examples.shop:checkout --input
'{"items": [{"sku": "book", "qty": 1}]}'`` or ``orchestrator graph examples.shop:checkout``.
"""
