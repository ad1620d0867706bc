"""Through the whole stream: POS API and ingest API → outbox → bus → warehouse sink → profile."""

from __future__ import annotations

from typing import Any

from omniloyal.analytics.sink import CONSUMER_NAME, handler_factory
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from omniloyal.events.consumers import Registry, Runtime, registry
from omniloyal.settings import Settings
from tests.conftest import Api
from tests.processing.test_pos import ok, shop
from tests.processing.test_pos import purchase as cheque

__all__ = ["shop"]

ADMIN = "/api/v1/admin"
POS = "/api/v1/pos"


def test_the_sink_is_registered_as_a_consumer() -> None:
    consumer = registry.get(CONSUMER_NAME)
    assert consumer.types == ("#",)


def test_purchase_and_web_events_reach_the_profile(
    api: Api, db: Database, settings: Settings, wh: Warehouse, shop: dict[str, Any]
) -> None:
    own = Registry()
    own.register_factory(CONSUMER_NAME, handler_factory)
    member = shop["member"]
    with Runtime(settings, db, registry=own, poll_timeout=0.1, idle_interval=0.02) as runtime:
        till = shop["hyper"]
        ok(till.post(f"{POS}/calculate", json=cheque("e2e-1", lines=[("MILK", "100.00", "3")])))
        ok(till.post(f"{POS}/confirm", json={"operation_id": "e2e-1"}))
        events = [
            {
                "id": "v1",
                "type": "page_view",
                "occurred_at": "2026-11-20T10:00:00+03:00",
                "anonymous_id": "visitor-1",
                "source": "web",
                "url": "https://shop.example/?utm_source=ads",
            },
            {
                "id": "v2",
                "type": "login",
                "occurred_at": "2026-11-20T10:01:00+03:00",
                "anonymous_id": "visitor-1",
                "member": {"id": member},
                "source": "web",
            },
        ]
        answer = ok(api.post("/api/v1/events", json=events))
        assert answer["accepted"] == 2, answer
        assert runtime.drain(20)
    profile = ok(api.get(f"{ADMIN}/members/{member}/profile", params={"limit": 50}))
    features = profile["features"]
    assert features["purchases_count"] == 1
    assert features["purchases_total"] == "300.00"
    assert features["favourite_stores"] == ["HYPER"]
    assert features["favourite_categories"] == ["Food / Dairy / Milk"]
    assert features["last_site_visit_at"] is not None
    ids = [i["id"] for i in profile["timeline"]["items"]]
    assert "v1" in ids and "v2" in ids
    assert any(i.startswith("purchase.confirmed:") for i in ids)
    assert profile["identifiers"]["anonymous_ids"] == ["visitor-1"]
