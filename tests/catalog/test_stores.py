"""Stores (points of sale): create, read, filter (attributes too), patch, refusals, roles."""

from __future__ import annotations

from typing import Any

from omniloyal.catalog.service import store_by_code
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import NotFound
from tests.catalog.helpers import ADMIN, audit, created, legal_entity, store
from tests.conftest import Api, assert_error, make_key


def _codes(api: Api, **params: Any) -> list[str]:
    return [s["code"] for s in created(api.get(f"{ADMIN}/stores", params=params), 200)["items"]]


def test_create_and_read_a_store(api: Api, db: Database) -> None:
    legal_entity(api, "LE1")
    legal_entity(api, "LE2")
    body = store(
        api,
        "MSK-001",
        legal_entity="LE2",
        channel="offline",
        address="Tverskaya 1",
        city="Moscow",
        region="Moscow",
        latitude=55.7575,
        longitude="37.6135",
        attributes={"CustomTradeFormat": "Hypermarket", "area": 5200, "parking": True, "tags": ["24h", 7]},
    )
    assert body["legal_entity"] == "LE2" and body["active"] is True
    assert body["latitude"] == 55.7575 and body["longitude"] == 37.6135
    assert body["attributes"]["tags"] == ["24h", 7]
    assert api.get(f"{ADMIN}/stores/MSK-001").json() == body
    # Without legal entity and time zone: the default entity and the retailer's zone.
    online = store(api, "WEB", channel="online_store", timezone=None)
    assert online["legal_entity"] == "LE1" and online["timezone"] == "Europe/Moscow"
    with db.reading() as session:
        assert store_by_code(session, "WEB").channel == "online_store"
        try:
            store_by_code(session, "nope")
            raise AssertionError("expected unknown_store")
        except NotFound as exc:
            assert exc.code == "unknown_store"
    assert audit(api, "store", "MSK-001")[0]["after"]["attributes"]["CustomTradeFormat"] == "Hypermarket"


def test_refusals_change_nothing(api: Api) -> None:
    def post(**fields: Any) -> Any:
        return api.post(f"{ADMIN}/stores", json={"code": "S1", "name": "S", **fields})

    assert_error(post(), 400, "legal_entity_required", "legal_entity")
    legal_entity(api, "LE1")
    assert_error(post(legal_entity="NOPE"), 404, "unknown_legal_entity", "legal_entity")
    assert_error(post(timezone="Mars/Olympus"), 422, "invalid_timezone", "timezone")
    assert_error(post(channel="kiosk"), 422, "invalid_channel", "channel")
    assert_error(post(latitude=90.5, longitude=10), 422, "invalid_latitude", "latitude")
    assert_error(post(latitude=10, longitude=-181), 422, "invalid_longitude", "longitude")
    assert_error(post(latitude=10), 400, "incomplete_coordinates", "longitude")
    assert_error(post(attributes={" ": 1}), 422, "invalid_attribute", "attributes")
    assert_error(post(attributes={"x": {"nested": 1}}), 422, "invalid_attribute", "attributes")
    assert_error(post(attributes={"x": [[1]]}), 422, "invalid_attribute", "attributes")
    assert_error(post(colour="red"), 422, "unknown_field", "colour")
    assert _codes(api) == []
    store(api, "S1")
    assert_error(post(), 409, "duplicate_code", "code")


def test_list_filters(api: Api) -> None:
    legal_entity(api, "LE1")
    legal_entity(api, "LE2")
    store(api, "HYPER-1", city="Moscow", attributes={"CustomTradeFormat": "Hypermarket", "floors": 2})
    store(api, "HYPER-2", city="Kazan", legal_entity="LE2", attributes={"CustomTradeFormat": "Hypermarket"})
    store(api, "SUPER-1", city="Moscow", attributes={"CustomTradeFormat": "Supermarket", "floors": [1, 2]})
    store(api, "APP", channel="mobile_app")
    assert _codes(api, attribute="CustomTradeFormat:Hypermarket") == ["HYPER-1", "HYPER-2"]
    assert _codes(api, attribute=["CustomTradeFormat:Hypermarket", "floors:2"]) == ["HYPER-1"]
    assert _codes(api, attribute="floors:2") == ["HYPER-1", "SUPER-1"]  # a list matches any element
    assert _codes(api, attribute="CustomTradeFormat:hypermarket") == []
    assert _codes(api, city="Moscow") == ["HYPER-1", "SUPER-1"]
    assert _codes(api, legal_entity="LE2") == ["HYPER-2"]
    assert _codes(api, channel="mobile_app") == ["APP"]
    assert _codes(api, channel="offline", city="Moscow", attribute="CustomTradeFormat:Supermarket") == [
        "SUPER-1"
    ]
    assert_error(
        api.get(f"{ADMIN}/stores", params={"attribute": "novalue"}),
        400,
        "invalid_attribute_filter",
        "attribute",
    )
    assert_error(api.get(f"{ADMIN}/stores", params={"legal_entity": "NOPE"}), 404, "unknown_legal_entity")
    assert_error(api.get(f"{ADMIN}/stores", params={"channel": "kiosk"}), 422, "invalid_choice", "channel")


def test_attribute_filter_pages_through_every_match(api: Api) -> None:
    legal_entity(api, "LE1")
    for i in range(9):
        store(api, f"S{i}", attributes={"format": "hyper" if i % 2 == 0 else "super"})
    seen: list[str] = []
    cursor = None
    while True:
        params = {"attribute": "format:hyper", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = created(api.get(f"{ADMIN}/stores", params=params), 200)
        seen += [s["code"] for s in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ["S0", "S2", "S4", "S6", "S8"]


def test_patch_is_partial_and_closes_stores(api: Api) -> None:
    legal_entity(api, "LE1")
    legal_entity(api, "LE2")
    store(api, "S1", city="Moscow", latitude=55.0, longitude=37.0, attributes={"a": 1, "b": 2})
    response = api.patch(f"{ADMIN}/stores/S1", json={"attributes": {"c": "x"}, "legal_entity": "LE2"})
    body = created(response, 200)
    assert body["attributes"] == {"c": "x"} and body["legal_entity"] == "LE2"
    assert body["city"] == "Moscow" and body["latitude"] == 55.0  # untouched
    body = created(api.patch(f"{ADMIN}/stores/S1", json={"active": False, "city": None}), 200)
    assert body["active"] is False and body["city"] is None
    assert _codes(api, active=False) == ["S1"]
    assert (
        created(api.patch(f"{ADMIN}/stores/S1", json={"latitude": None, "longitude": None}), 200)["latitude"]
        is None
    )
    assert_error(
        api.patch(f"{ADMIN}/stores/S1", json={"latitude": 1}), 400, "incomplete_coordinates", "longitude"
    )
    assert_error(api.patch(f"{ADMIN}/stores/S1", json={"name": None}), 422, "null_not_allowed", "name")
    assert_error(api.patch(f"{ADMIN}/stores/S1", json={"code": "S2"}), 422, "unknown_field", "code")
    assert_error(api.patch(f"{ADMIN}/stores/S1", json={"legal_entity": "NOPE"}), 404, "unknown_legal_entity")
    assert_error(api.patch(f"{ADMIN}/stores/NOPE", json={"name": "x"}), 404, "unknown_store")
    updates = [r for r in audit(api, "store", "S1") if r["action"] == "update"]
    assert len(updates) == 3
    assert updates[-1]["before"] == {"attributes": {"a": 1, "b": 2}, "legal_entity": "LE1"}


def test_roles(api: Api, db: Database) -> None:
    legal_entity(api, "LE1")
    store(api, "S1")
    analyst = api.as_key(make_key(db, "analyst"))
    marketer = api.as_key(make_key(db, "marketer"))
    pos = api.as_key(make_key(db, "pos", store="S1"))
    body = {"code": "S2", "name": "S2", "timezone": "UTC"}
    assert_error(analyst.post(f"{ADMIN}/stores", json=body), 403, "forbidden")
    assert_error(marketer.patch(f"{ADMIN}/stores/S1", json={"name": "x"}), 403, "forbidden")
    assert_error(pos.get(f"{ADMIN}/stores"), 403, "forbidden")
    assert analyst.get(f"{ADMIN}/stores/S1").status_code == 200
    assert marketer.get(f"{ADMIN}/stores").status_code == 200
