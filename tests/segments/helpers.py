"""Shared by the segments tests: the outbox as envelopes, API shortcuts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from omniloyal.db.engine import Database
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import OutboxEvent
from tests.conftest import Api

SEGMENTS = "/api/v1/admin/segments"


def outbox(db: Database, *types: str, after: int = 0) -> list[EventEnvelope]:
    """Envelopes written to the outbox (of these types), oldest first."""
    with db.reading() as session:
        stmt = select(OutboxEvent).where(OutboxEvent.seq > after).order_by(OutboxEvent.seq)
        if types:
            stmt = stmt.where(OutboxEvent.type.in_(types))
        return [EventEnvelope.model_validate(row.payload) for row in session.scalars(stmt)]


def last_seq(db: Database) -> int:
    with db.reading() as session:
        return int(session.scalar(select(OutboxEvent.seq).order_by(OutboxEvent.seq.desc()).limit(1)) or 0)


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def create(api: Api, conditions: dict[str, Any], name: str = "Segment", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = ok(
        api.post(SEGMENTS, json={"name": name, "conditions": conditions, **fields}), 201
    )
    return body


ADMIN = "/api/v1/admin"
POS = "/api/v1/pos"
KAZAN = {"type": "profile", "field": "city", "op": "eq", "value": "Kazan"}
# 10% off every cheque of members in the target audience "kazan".
KAZAN_10 = [
    {
        "event": "discount_calculation",
        "filters": [{"type": "audience", "audiences": ["kazan"]}],
        "actions": [{"type": "discount", "kind": "percent", "value": "10"}],
    }
]


def shop(api: Api, db: Database) -> Api:
    """A hypermarket selling milk, the audience "kazan" and an active offer filtering on it;
    returns the till's API."""
    from omniloyal.offers.models import Offer
    from tests.conftest import make_key

    ok(api.post(f"{ADMIN}/legal-entities", json={"code": "LE", "name": "Retail LLC"}), 201)
    store = {
        "code": "HYPER",
        "name": "Hyper",
        "legal_entity": "LE",
        "channel": "offline",
        "timezone": "Europe/Moscow",
    }
    ok(api.post(f"{ADMIN}/stores", json={**store, "attributes": {"CustomTradeFormat": "Hypermarket"}}), 201)
    ok(api.post(f"{ADMIN}/payment-methods", json={"code": "card", "name": "Card"}), 201)
    ok(
        api.post(
            f"{ADMIN}/products",
            json={"sku": "MILK", "name": "Milk", "price": "100.00", "category": "Food / Dairy"},
        ),
        201,
    )
    ok(api.post(f"{ADMIN}/audiences", json={"code": "kazan", "name": "Kazan"}), 201)
    with db.transaction() as session:
        session.add(Offer(name="10% for Kazan", status="active", chains=KAZAN_10))
    return api.as_key(make_key(db, "pos", store="HYPER"))


def new_member(api: Api, card: str, city: str, **fields: Any) -> int:
    body = {
        "first_name": "M" + card,
        "city": city,
        "cards": [{"number": card, "kind": "physical", "state": "activated"}],
    }
    member: dict[str, Any] = ok(api.post(f"{ADMIN}/members", json={**body, **fields}), 201)
    return int(member["id"])


def cheque_discount(till: Api, operation: str, card: str) -> str:
    body = {
        "operation_id": operation,
        "identifier": {"card": card},
        "cheque": {
            "number": f"C-{operation}",
            "created_at": "2026-11-23T12:00:00+03:00",
            "lines": [{"line": 1, "sku": "MILK", "price": "100.00", "quantity": "2", "amount": "200.00"}],
            "payments": [{"method": "card", "amount": "200.00"}],
        },
    }
    answer = ok(till.post(f"{POS}/calculate", json=body))
    return str(answer["totals"]["discount"])
