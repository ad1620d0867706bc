"""The events processing writes to the outbox: the contract the warehouse sink reads.

``purchase.confirmed`` carries the whole cheque so the marketing side never has to query
the operational store: store, channel, payments, and each line with its category path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal

from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.outbox import envelope
from omniloyal.processing.models import Operation, PurchaseLine


def _money(value: Decimal) -> str:
    return f"{value:.2f}"


def purchase_confirmed(
    operation: Operation,
    lines: Sequence[PurchaseLine],
    *,
    store_code: str,
    channel: str,
    categories: Mapping[str, str | None],
) -> EventEnvelope:
    """``categories`` maps each sku to its category path ("Food/Dairy/Milk") or None."""
    write_off = sum((Decimal(v) for v in operation.write_off.values()), Decimal(0))
    return envelope(
        f"purchase.confirmed:{operation.id}",
        "purchase.confirmed",
        member_id=operation.member_id,
        occurred_at=operation.cheque_at,
        source=channel,
        store=store_code,
        properties={
            "operation": operation.id,
            "operation_id": operation.operation_id,
            "kind": operation.kind,
            "channel": channel,
            "cheque_number": operation.cheque_number,
            "amount": _money(operation.amount),
            "discount": _money(operation.discount),
            # What the buyer paid in money: amount after discount and points.
            "paid": _money(operation.amount - operation.discount - write_off),
            "write_off": dict(operation.write_off),
            "accrual": dict(operation.accrual),
            "payments": list(operation.payments),
            "lines": [
                {
                    "line": line.line,
                    "sku": line.sku,
                    "category": categories.get(line.sku),
                    "price": _money(line.price),
                    "quantity": f"{line.quantity:f}",
                    "amount": _money(line.amount),
                    "discount": _money(line.discount),
                }
                for line in lines
            ],
        },
    )


def purchase_refunded(
    refund: Operation,
    purchase: Operation,
    refunded: Sequence[tuple[PurchaseLine, Decimal, Decimal]],
    *,
    store_code: str,
    channel: str,
) -> EventEnvelope:
    """``refunded`` holds (purchase line, quantity returned, money returned) per line."""
    return envelope(
        f"purchase.refunded:{refund.id}",
        "purchase.refunded",
        member_id=purchase.member_id,
        occurred_at=refund.cheque_at,
        source=channel,
        store=store_code,
        properties={
            "operation": refund.id,
            "operation_id": refund.operation_id,
            "purchase_operation": purchase.id,
            "channel": channel,
            "amount": _money(sum((money for _, _, money in refunded), Decimal(0))),
            "lines": [
                {"line": line.line, "sku": line.sku, "quantity": f"{qty:f}", "amount": _money(money)}
                for line, qty, money in refunded
            ],
        },
    )
