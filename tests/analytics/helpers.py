"""Envelopes as the platform and the ingest API write them, for the warehouse tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.outbox import envelope

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def purchase(
    operation: int,
    member_id: int | None,
    lines: list[tuple[str, str | None, str]],
    *,
    minutes: float = 0,
    store: str = "S1",
    channel: str = "offline",
    discount: str = "0.00",
) -> EventEnvelope:
    """``lines``: (sku, category, amount) with quantity 1."""
    amount = sum((Decimal(a) for _, _, a in lines), Decimal(0))
    return envelope(
        f"purchase.confirmed:{operation}",
        "purchase.confirmed",
        member_id=member_id,
        occurred_at=at(minutes),
        source=channel,
        store=store,
        properties={
            "operation": operation,
            "operation_id": f"till-{operation}",
            "kind": "purchase",
            "channel": channel,
            "cheque_number": str(operation),
            "amount": f"{amount:.2f}",
            "discount": discount,
            "paid": f"{amount - Decimal(discount):.2f}",
            "write_off": {},
            "accrual": {"bonus": "5.00"},
            "payments": [{"method": "card", "amount": f"{amount:.2f}"}],
            "lines": [
                {
                    "line": i,
                    "sku": sku,
                    "category": category,
                    "price": a,
                    "quantity": "1",
                    "amount": a,
                    "discount": "0.00",
                }
                for i, (sku, category, a) in enumerate(lines, start=1)
            ],
        },
    )


def refund(
    operation: int,
    purchase_operation: int,
    member_id: int | None,
    lines: list[tuple[int, str, str]],
    minutes: float,
) -> EventEnvelope:
    """``lines``: (line, sku, amount) returned with quantity 1."""
    amount = sum((Decimal(a) for _, _, a in lines), Decimal(0))
    return envelope(
        f"purchase.refunded:{operation}",
        "purchase.refunded",
        member_id=member_id,
        occurred_at=at(minutes),
        source="offline",
        store="S1",
        properties={
            "operation": operation,
            "operation_id": f"till-{operation}",
            "purchase_operation": purchase_operation,
            "channel": "offline",
            "amount": f"{amount:.2f}",
            "lines": [{"line": n, "sku": sku, "quantity": "1", "amount": a} for n, sku, a in lines],
        },
    )


def cancelled(operation: int, member_id: int | None, minutes: float) -> EventEnvelope:
    return envelope(
        f"purchase.cancelled:{operation}",
        "purchase.cancelled",
        member_id=member_id,
        occurred_at=at(minutes),
        source="offline",
        store="S1",
        properties={"operation": operation, "operation_id": f"till-{operation}", "channel": "offline"},
    )


def web(
    event_id: str,
    event_type: str = "page_view",
    *,
    member_id: int | None = None,
    anonymous_id: str | None = None,
    minutes: float = 0,
    source: str = "web",
    **properties: Any,
) -> EventEnvelope:
    return envelope(
        event_id,
        event_type,
        member_id=member_id,
        anonymous_id=anonymous_id,
        occurred_at=at(minutes),
        source=source,
        properties=properties or {"url": "https://shop.example/"},
        utm={"utm_source": "newsletter"} if event_type == "page_view" else {},
    )


def registered(member_id: int, minutes: float = -1000, **fields: Any) -> EventEnvelope:
    member = {
        "first_name": "Anna",
        "last_name": "Petrova",
        "gender": "female",
        "birth_date": "1990-05-17",
        "city": "Moscow",
        "phone": "+79001234567",
        "email": "anna@example.com",
        "children": [],
        "pets": ["cat"],
        "preferred_categories": ["Food"],
        "attributes": {"vip": True},
        "consents": {"email": {"granted": True, "at": at(minutes).isoformat(), "source": "web"}},
        "created_at": at(minutes).isoformat(),
        **fields,
    }
    return envelope(
        f"member.registered:{member_id}",
        "member.registered",
        member_id=member_id,
        occurred_at=at(minutes),
        properties={"member": member},
    )


def linked(member_id: int, anonymous_id: str, minutes: float) -> EventEnvelope:
    return envelope(
        f"identity.linked:{anonymous_id}",
        "identity.linked",
        member_id=member_id,
        occurred_at=at(minutes),
        source="web",
        properties={"anonymous_id": anonymous_id},
    )


def merged(kept: int, duplicate: int, minutes: float) -> EventEnvelope:
    return envelope(
        f"member.merged:{duplicate}",
        "member.merged",
        member_id=kept,
        occurred_at=at(minutes),
        properties={"merged_member_id": duplicate, "kept_member_id": kept},
    )
