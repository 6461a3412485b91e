"""A shop checkout saga: reserve stock, charge the card, create the order, then notify.

Steps and their compensations:

=======================  =================================  ==============================
step                     action                             compensation
=======================  =================================  ==============================
reserve-inventory        reserve the items' stock           release the reservation
charge-payment           charge the card (2 retries)        refund the charge
create-order             create the order                   cancel the order
add-free-gift            (orders of 100.00 or more only)    put the gift back in stock
send-confirmation        e-mail the customer                (none: an e-mail can't be unsent)
update-loyalty-points    credit loyalty points              debit them again
=======================  =================================  ==============================

``send-confirmation`` and ``update-loyalty-points`` run in parallel. Failures are injected by
the input: ``{"fail_at": "<step name>"}`` makes that step raise; ``{"fail_payment": true}``
pays with a card the payment service declines (a permanent failure: no retries).

Run it from the repository root::

    orchestrator run examples.shop:checkout --input '{"customer": "ada@example.com",
        "items": [{"sku": "book", "qty": 2}]}'
    orchestrator run examples.shop:checkout --input '{"items": [{"sku": "book", "qty": 1}],
        "fail_at": "create-order"}'
    orchestrator graph examples.shop:checkout
"""

from __future__ import annotations

import itertools
from typing import Any

from rich.console import Console
from rich.text import Text

from orchestrator import (
    LocalEngine,
    StepContext,
    StepResponse,
    StepState,
    TransactionState,
    WorkflowData,
    WorkflowResponse,
    create_step,
    create_workflow,
    parallelize,
    transform,
    when,
)
from orchestrator.cli import render_result

__all__ = [
    "Inventory",
    "Loyalty",
    "Notifications",
    "Orders",
    "Payments",
    "ShopContainer",
    "checkout",
    "demo",
    "make_container",
]

PRICES = {"book": 2500, "pen": 300, "lamp": 8900, "gift-card": 0}
"""Unit prices in cents."""
STOCK = {"book": 10, "pen": 50, "lamp": 3, "gift-card": 5}
FREE_GIFT_THRESHOLD = 10000
"""Orders of at least this many cents get a free gift."""


class InjectedFailure(RuntimeError):
    """The failure asked for by ``{"fail_at": "<step>"}``."""


class OutOfStock(Exception):
    """Not enough stock for a reservation."""


class PaymentDeclined(Exception):
    """The card was declined."""


# ----------------------------------------------------------------------- in-memory services
class Inventory:
    """Stock levels and reservations; reserving twice with one key reserves once."""

    def __init__(self, journal: list[str], stock: dict[str, int] | None = None) -> None:
        self.journal = journal
        self.stock = dict(STOCK if stock is None else stock)
        self.reservations: dict[str, dict[str, Any]] = {}
        self._by_key: dict[str, str] = {}
        self._ids = itertools.count(1)

    async def reserve(self, items: list[dict[str, Any]], *, key: str) -> dict[str, Any]:
        if key in self._by_key:  # a retried step: the same reservation
            return self.reservations[self._by_key[key]]
        for item in items:
            sku, qty = item["sku"], int(item["qty"])
            if sku not in PRICES:
                raise OutOfStock(f"unknown product {sku!r}")
            if self.stock.get(sku, 0) < qty:
                raise OutOfStock(f"only {self.stock.get(sku, 0)} {sku!r} left, {qty} wanted")
        lines = []
        for item in items:
            self.stock[item["sku"]] -= int(item["qty"])
            lines.append(
                {"sku": item["sku"], "qty": int(item["qty"]), "price": PRICES[item["sku"]]}
            )
        reservation = {"id": f"res-{next(self._ids)}", "items": lines}
        self.reservations[reservation["id"]] = reservation
        self._by_key[key] = reservation["id"]
        self.journal.append(f"inventory: reserved {reservation['id']} {_describe(lines)}")
        return reservation

    async def release(self, reservation_id: str) -> None:
        reservation = self.reservations.pop(reservation_id, None)
        if reservation is None:  # already released: compensations may run again
            return
        for line in reservation["items"]:
            self.stock[line["sku"]] += line["qty"]
        self.journal.append(f"inventory: released {reservation_id}")


class Payments:
    """Charges and refunds; the card ``tok_declined`` is always declined."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.charges: dict[str, dict[str, Any]] = {}
        self.refunds: list[str] = []
        self._ids = itertools.count(1)

    async def charge(self, amount: int, card: str, *, reference: str) -> dict[str, Any]:
        if card == "tok_declined":
            raise PaymentDeclined(f"card {card} declined for {amount / 100:.2f}")
        charge = {"id": f"ch-{next(self._ids)}", "amount": amount, "reference": reference}
        self.charges[charge["id"]] = charge
        self.journal.append(f"payments: charged {charge['id']} {amount / 100:.2f}")
        return charge

    async def refund(self, charge_id: str) -> None:
        if charge_id in self.charges and charge_id not in self.refunds:
            self.refunds.append(charge_id)
            amount = self.charges[charge_id]["amount"]
            self.journal.append(f"payments: refunded {charge_id} {amount / 100:.2f}")


class Orders:
    """Orders, which can be cancelled."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.orders: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1001)

    async def create(
        self, customer: str, lines: list[dict[str, Any]], charge: dict[str, Any]
    ) -> dict[str, Any]:
        order = {
            "id": f"ord-{next(self._ids)}",
            "customer": customer,
            "lines": lines,
            "total": charge["amount"],
            "charge": charge["id"],
            "status": "placed",
        }
        self.orders[order["id"]] = order
        self.journal.append(f"orders: created {order['id']} for {customer}")
        return order

    async def cancel(self, order_id: str) -> None:
        order = self.orders.get(order_id)
        if order is not None and order["status"] != "cancelled":
            order["status"] = "cancelled"
            self.journal.append(f"orders: cancelled {order_id}")


class Notifications:
    """An outbox of e-mails."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.sent: list[dict[str, str]] = []

    async def send(self, to: str, subject: str) -> dict[str, str]:
        message = {"id": f"msg-{len(self.sent) + 1}", "to": to, "subject": subject}
        self.sent.append(message)
        self.journal.append(f"notifications: e-mailed {to}: {subject}")
        return message


class Loyalty:
    """Loyalty point balances."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.balances: dict[str, int] = {}

    async def credit(self, customer: str, points: int) -> dict[str, Any]:
        self.balances[customer] = self.balances.get(customer, 0) + points
        self.journal.append(f"loyalty: credited {points} points to {customer}")
        return {"customer": customer, "points": points, "balance": self.balances[customer]}

    async def debit(self, customer: str, points: int) -> None:
        self.balances[customer] = self.balances.get(customer, 0) - points
        self.journal.append(f"loyalty: debited {points} points from {customer}")


class ShopContainer:
    """The services the steps resolve by name; ``journal`` records what each one did."""

    def __init__(self) -> None:
        self.journal: list[str] = []
        self.services: dict[str, Any] = {
            "inventory": Inventory(self.journal),
            "payments": Payments(self.journal),
            "orders": Orders(self.journal),
            "notifications": Notifications(self.journal),
            "loyalty": Loyalty(self.journal),
        }

    def resolve(self, name: str) -> Any:
        return self.services[name]


def make_container() -> ShopContainer:
    """A fresh shop (the CLI calls this for ``orchestrator run examples.shop:checkout``)."""
    return ShopContainer()


def _describe(lines: list[dict[str, Any]]) -> str:
    return ", ".join(f"{line['qty']}x {line['sku']}" for line in lines)


def _maybe_fail(data: dict[str, Any], ctx: StepContext) -> None:
    if data.get("fail_at") == ctx.step_name:
        raise InjectedFailure(f"injected failure at {ctx.step_name} (attempt {ctx.attempt})")


# ----------------------------------------------------------------------------------- steps
@create_step("reserve-inventory")
async def reserve_inventory(data: dict[str, Any], ctx: StepContext) -> StepResponse[Any]:
    _maybe_fail(data, ctx)
    inventory: Inventory = ctx.container.resolve("inventory")
    try:
        reservation = await inventory.reserve(data["items"] or [], key=ctx.idempotency_key)
    except OutOfStock as exc:
        StepResponse.permanent_failure(str(exc))
    return StepResponse(reservation, compensate_input=reservation["id"])


@reserve_inventory.compensate
async def release_inventory(reservation_id: str | None, ctx: StepContext) -> None:
    if reservation_id:
        await ctx.container.resolve("inventory").release(reservation_id)


@create_step("charge-payment", max_retries=2)
async def charge_payment(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _maybe_fail(data, ctx)
    payments: Payments = ctx.container.resolve("payments")
    try:
        charge: dict[str, Any] = await payments.charge(
            data["amount"], data["card"], reference=data["reference"]
        )
    except PaymentDeclined as exc:  # retrying won't help
        StepResponse.permanent_failure(str(exc))
    return charge


@charge_payment.compensate
async def refund_payment(charge: dict[str, Any] | None, ctx: StepContext) -> None:
    if charge:
        await ctx.container.resolve("payments").refund(charge["id"])


@create_step("create-order")
async def create_order(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    _maybe_fail(data, ctx)
    orders: Orders = ctx.container.resolve("orders")
    order: dict[str, Any] = await orders.create(
        data["customer"], data["reservation"]["items"], data["charge"]
    )
    return order


@create_order.compensate
async def cancel_order(order: dict[str, Any] | None, ctx: StepContext) -> None:
    if order:
        await ctx.container.resolve("orders").cancel(order["id"])


@create_step("add-free-gift")
async def add_free_gift(data: dict[str, Any], ctx: StepContext) -> StepResponse[Any]:
    _maybe_fail(data, ctx)
    inventory: Inventory = ctx.container.resolve("inventory")
    gift = await inventory.reserve([{"sku": "gift-card", "qty": 1}], key=ctx.idempotency_key)
    return StepResponse({"sku": "gift-card", "reservation": gift["id"]}, gift["id"])


@add_free_gift.compensate
async def return_free_gift(reservation_id: str | None, ctx: StepContext) -> None:
    if reservation_id:
        await ctx.container.resolve("inventory").release(reservation_id)


@create_step("send-confirmation")
async def send_confirmation(data: dict[str, Any], ctx: StepContext) -> dict[str, str]:
    _maybe_fail(data, ctx)
    order = data["order"]
    notifications: Notifications = ctx.container.resolve("notifications")
    return await notifications.send(order["customer"], f"Your order {order['id']} is confirmed")


@create_step("update-loyalty-points")
async def update_loyalty_points(data: dict[str, Any], ctx: StepContext) -> StepResponse[Any]:
    _maybe_fail(data, ctx)
    loyalty: Loyalty = ctx.container.resolve("loyalty")
    credited = await loyalty.credit(data["customer"], data["points"])
    return StepResponse(credited, {"customer": data["customer"], "points": data["points"]})


@update_loyalty_points.compensate
async def revoke_loyalty_points(credit: dict[str, Any] | None, ctx: StepContext) -> None:
    if credit:
        await ctx.container.resolve("loyalty").debit(credit["customer"], credit["points"])


# -------------------------------------------------------------------------------- workflow
def _payment_request(v: dict[str, Any]) -> dict[str, Any]:
    """The charge for a reservation: its total, and the card (a declined one on request)."""
    order_input, reservation = v["input"], v["reservation"]
    card = "tok_declined" if order_input.get("fail_payment") else order_input.get("card")
    return {
        "amount": sum(line["qty"] * line["price"] for line in reservation["items"]),
        "card": card or "tok_visa",
        "reference": reservation["id"],
        "fail_at": order_input.get("fail_at"),
    }


def _loyalty_credit(v: dict[str, Any]) -> dict[str, Any]:
    """One point per whole unit of currency spent."""
    return {
        "customer": v["order"]["customer"],
        "points": v["order"]["total"] // 100,
        "fail_at": v["fail_at"],
    }


@create_workflow("checkout")
def checkout(input: WorkflowData) -> WorkflowResponse:
    """Reserve, charge, create the order, add a gift to big orders, then notify and reward."""
    reservation = reserve_inventory({"items": input["items"], "fail_at": input.fail_at})
    charge = charge_payment(
        transform({"input": input, "reservation": reservation}, _payment_request)
    )
    order = create_order(
        {
            "customer": input.customer,
            "reservation": reservation,
            "charge": charge,
            "fail_at": input.fail_at,
        }
    )
    gift = when("free-gift", order, lambda o: o["total"] >= FREE_GIFT_THRESHOLD).then(
        lambda: add_free_gift({"order": order, "fail_at": input.fail_at})
    )
    confirmation, loyalty = parallelize(
        send_confirmation({"order": order, "fail_at": input.fail_at}),
        update_loyalty_points(
            transform({"order": order, "fail_at": input.fail_at}, _loyalty_credit)
        ),
    )
    return WorkflowResponse(
        {
            "order": order,
            "charge": charge,
            "gift": gift,
            "confirmation": confirmation,
            "loyalty": loyalty,
        }
    )


# ------------------------------------------------------------------------------------ demo
async def demo(console: Console) -> list[tuple[str, bool]]:
    """Run one checkout that succeeds and one that fails and is compensated.

    Returns what was expected, each with whether it held.
    """
    shop = make_container()
    checks: list[tuple[str, bool]] = []
    async with LocalEngine(workflows=[checkout], container=shop) as engine:
        console.print(Text("A checkout that succeeds (big enough for a free gift)", style="bold"))
        ok = await engine.run(
            checkout,
            input={
                "customer": "ada@example.com",
                "items": [{"sku": "lamp", "qty": 1}, {"sku": "book", "qty": 2}],
            },
            transaction_id="order-1",
        )
        render_result(ok, console)
        order = (ok.result or {}).get("order") or {}
        checks.append(("checkout order-1 is done", ok.state == TransactionState.DONE))
        checks.append(("order-1 got a free gift", (ok.result or {}).get("gift") is not None))
        placed = shop.services["orders"].orders.get(order.get("id"), {})
        checks.append(("order-1 is placed", placed.get("status") == "placed"))

        console.print()
        console.print(Text('A checkout with {"fail_at": "create-order"}', style="bold"))
        stock_before = dict(shop.services["inventory"].stock)
        journal_start = len(shop.journal)
        failed = await engine.run(
            checkout,
            input={
                "customer": "grace@example.com",
                "items": [{"sku": "pen", "qty": 3}],
                "fail_at": "create-order",
            },
            transaction_id="order-2",
            throw_on_error=False,
        )
        render_result(failed, console)
        compensated = [s.name for s in failed.steps if s.compensate_attempts]
        console.print(
            Text.assemble(("compensations ran for: ", "yellow"), ", ".join(reversed(compensated)))
        )
        for line in shop.journal[journal_start:]:
            console.print(Text(f"  {line}"), soft_wrap=True)
        steps = failed.step_table
        checks.append(("checkout order-2 is reverted", failed.state == TransactionState.REVERTED))
        checks.append(
            (
                "order-2's charge was refunded and its stock released",
                steps["charge-payment"].state == StepState.REVERTED
                and steps["reserve-inventory"].state == StepState.REVERTED
                and len(shop.services["payments"].refunds) == 1
                and shop.services["inventory"].stock == stock_before,
            )
        )
    return checks
