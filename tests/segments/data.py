"""A small customer base covering every condition family, loaded into a warehouse."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.events.envelope import EventEnvelope
from omniloyal.segments import tables
from tests.analytics.helpers import T0, cancelled, merged, purchase, refund, registered, web

NOW = T0 + timedelta(hours=1)
DAY = 24 * 60


def days(n: float) -> float:
    """Minutes from T0 for ``n`` days ago."""
    return -n * DAY


def events() -> list[EventEnvelope]:
    return [
        registered(
            1,
            days(400),
            first_name="Anna",
            gender="female",
            city="Moscow",
            birth_date="1990-05-17",
            pets=["cat"],
            preferred_categories=["Food"],
            attributes={"vip": True, "level": 3, "tier": "gold"},
            consents={"email": {"granted": True}},
        ),
        registered(
            2,
            days(30),
            first_name="Boris",
            gender="male",
            city="Kazan",
            birth_date="1980-01-10",
            phone=None,
            children=[{"name": "Ivan"}],
            pets=[],
            preferred_categories=[],
            attributes={"level": 1},
            consents={"sms": {"granted": True}, "email": {"granted": False}, "news": {"granted": True}},
        ),
        registered(
            3,
            days(3),
            first_name="Clara",
            gender="female",
            city=None,
            birth_date=None,
            pets=[],
            preferred_categories=[],
            attributes={},
            consents={},
        ),
        registered(
            4,
            days(200),
            first_name="Dmitry",
            gender="male",
            city="Moscow",
            birth_date="2000-03-01",
            children=[{"name": "A"}, {"name": "B"}],
            pets=["dog"],
            preferred_categories=["Drinks"],
            attributes={"level": 5, "tier": "silver"},
            consents={"email": {"granted": True}, "sms": {"granted": False}},
        ),
        registered(5, days(50), first_name="Anna-duplicate", city="Moscow", attributes={"vip": True}),
        merged(1, 5, days(10)),
        # Anna: recent milk, older TV online.
        purchase(1, 1, [("MILK", "Food / Dairy / Milk", "100.00")], minutes=days(2), store="S1"),
        purchase(
            2,
            1,
            [("TV", "Electronics / TV", "900.00")],
            minutes=days(40),
            store="S2",
            channel="online_store",
        ),
        # Boris: one old milk.
        purchase(3, 2, [("MILK", "Food / Dairy / Milk", "50.00")], minutes=days(100), store="S1"),
        # Dmitry: bread twice (one refunded), a cancelled big cheque.
        purchase(4, 4, [("BREAD", "Food / Bakery", "30.00")], minutes=days(5), store="S3"),
        purchase(5, 4, [("BREAD", "Food / Bakery", "30.00")], minutes=days(6), store="S3"),
        refund(104, 4, 4, [(1, "BREAD", "30.00")], minutes=days(4)),
        purchase(6, 4, [("WINE", "Drinks / Wine", "500.00")], minutes=days(7), store="S3"),
        cancelled(6, 4, minutes=days(7) + 10),
        # An anonymous purchase: belongs to nobody.
        purchase(7, None, [("MILK", "Food / Dairy / Milk", "10.00")], minutes=days(1)),
        # Web, app and messages.
        web("e1", "product_view", member_id=2, minutes=days(1), sku="MILK"),
        web("e2", "page_view", member_id=2, minutes=days(1)),
        web("e3", "page_view", member_id=3, minutes=days(3)),
        web("e4", "page_view", member_id=3, minutes=days(2)),
        web("e5", "page_view", member_id=3, minutes=days(1)),
        web("e6", "section_view", member_id=3, minutes=days(1), section="sale"),
        web("e7", "category_view", member_id=1, minutes=days(20), category="Food / Dairy"),
        web("e8", "page_view", member_id=4, minutes=days(2), source="mobile_app"),
        web("e9", "message.opened", member_id=1, minutes=days(1), source="email", campaign="spring"),
        web("e10", "message.delivered", member_id=2, minutes=days(1), source="email", campaign="spring"),
        web("e11", "message.clicked", member_id=4, minutes=days(9), source="email", campaign="summer"),
        web("e12", "message.unsubscribed", member_id=4, minutes=days(8), source="email", campaign="summer"),
        web("e13", "custom", member_id=1, minutes=days(1), name="quiz", score=7),
        web("e14", "custom", member_id=2, minutes=days(1), name="quiz", score=3),
    ]


def loyalty_rows() -> dict[str, list[dict[str, Any]]]:
    return {
        "member_loyalty": [
            {
                "member_id": 1,
                "status": "active",
                "phone_valid": True,
                "phone_mobile": True,
                "email_valid": True,
            },
            {
                "member_id": 2,
                "status": "active",
                "phone_valid": False,
                "phone_mobile": False,
                "email_valid": True,
            },
            {
                "member_id": 3,
                "status": "active",
                "phone_valid": True,
                "phone_mobile": False,
                "email_valid": False,
            },
            {
                "member_id": 4,
                "status": "blocked",
                "phone_valid": True,
                "phone_mobile": True,
                "email_valid": True,
            },
        ],
        "member_balances": [
            {"member_id": 1, "currency": "bonus", "balance": Decimal("150.00")},
            {"member_id": 2, "currency": "bonus", "balance": Decimal("20.00")},
            {"member_id": 4, "currency": "stars", "balance": Decimal("5.00")},
        ],
        "member_cards": [
            {"member_id": 1, "card": "1001", "state": "activated", "blocked": False},
            {"member_id": 2, "card": "1002", "state": "activated", "blocked": True},
            {"member_id": 4, "card": "1004", "state": "issued", "blocked": False},
        ],
        "audience_members": [
            {"audience": "vip", "member_id": 1},
            {"audience": "vip", "member_id": 4},
            {"audience": "parents", "member_id": 2},
        ],
        "rfm_scores": [
            _rfm(1, 5, 5, 5, "best"),
            _rfm(2, 1, 2, 1, "lost"),
            _rfm(4, 4, 4, 2, "champions"),
        ],
    }


def _rfm(member_id: int, r: int, f: int, m: int, group: str) -> dict[str, Any]:
    return {
        "member_id": member_id,
        "recency_days": 1,
        "frequency": 1,
        "monetary": Decimal("1.00"),
        "last_purchase_at": NOW,
        "r": r,
        "f": f,
        "m": m,
        "rfm_cell": f"R{r}F{f}M{m}",
        "rfm_group": group,
        "period_days": 365,
        "computed_at": NOW,
    }


def fill(wh: Warehouse) -> None:
    tables.ensure(wh)
    load(wh, events())
    for name, items in loyalty_rows().items():
        tables.insert(wh, name, [{**item, "updated_at": NOW} for item in items])
