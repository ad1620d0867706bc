"""Stock per store and "which store near me has it"."""

from __future__ import annotations

from typing import Any

from omniloyal.catalog.service import distance_km
from omniloyal.db.engine import Database
from tests.catalog.helpers import ADMIN, audit, created, legal_entity, product, store
from tests.conftest import Api, assert_error, make_key

# Moscow, Red Square; stores 0.7 km and 7 km away, one in Saint Petersburg, one closed next door.
HERE = {"lat": 55.7539, "lon": 37.6208}


def _setup(api: Api) -> None:
    legal_entity(api, "LE1")
    store(api, "SPB", latitude=59.9343, longitude=30.3351)
    store(api, "FAR", latitude=55.7963, longitude=37.5379)
    store(api, "NEAR", latitude=55.7601, longitude=37.6186)
    store(api, "WEB", channel="online_store")
    store(api, "CLOSED", latitude=55.7540, longitude=37.6209)
    product(api, "MILK")
    product(api, "TEA")


def _put(api: Api, code: str, items: list[dict[str, Any]]) -> Any:
    return api.put(f"{ADMIN}/stores/{code}/stock", json={"items": items})


def test_haversine() -> None:
    assert abs(distance_km(55.7558, 37.6173, 59.9343, 30.3351) - 633.0) < 2  # Moscow to Saint Petersburg
    assert distance_km(10, 10, 10, 10) == 0


def test_put_and_list_stock(api: Api) -> None:
    _setup(api)
    result = created(
        _put(api, "NEAR", [{"sku": "MILK", "quantity": "12.5"}, {"sku": "TEA", "quantity": 3}]), 200
    )
    assert result == {"store": "NEAR", "updated": 2}
    created(_put(api, "NEAR", [{"sku": "MILK", "quantity": "0"}]), 200)  # upsert; TEA keeps its quantity
    page = created(api.get(f"{ADMIN}/stores/NEAR/stock"), 200)
    assert [(s["sku"], s["quantity"]) for s in page["items"]] == [("MILK", "0.000"), ("TEA", "3.000")]
    records = [r for r in audit(api, "store", "NEAR") if r["action"] == "set_stock"]
    assert records[0]["before"] == {"stock": {"MILK": "12.500"}} and records[0]["after"] == {
        "stock": {"MILK": "0.000"}
    }
    assert records[1]["after"]["stock"] == {"MILK": "12.500", "TEA": "3.000"}
    first = created(api.get(f"{ADMIN}/stores/NEAR/stock", params={"limit": 1}), 200)
    second = created(
        api.get(f"{ADMIN}/stores/NEAR/stock", params={"limit": 1, "cursor": first["next_cursor"]}), 200
    )
    assert [first["items"][0]["sku"], second["items"][0]["sku"]] == ["MILK", "TEA"]


def test_stock_refusals_change_nothing(api: Api, db: Database) -> None:
    _setup(api)
    assert_error(_put(api, "NOPE", [{"sku": "MILK", "quantity": "1"}]), 404, "unknown_store")
    assert_error(
        _put(api, "NEAR", [{"sku": "MILK", "quantity": "1"}, {"sku": "GONE", "quantity": "1"}]),
        404,
        "unknown_product",
        "items.1.sku",
    )
    assert_error(
        _put(api, "NEAR", [{"sku": "MILK", "quantity": "1"}, {"sku": "MILK", "quantity": "2"}]),
        400,
        "duplicate_in_batch",
        "items.1.sku",
    )
    assert_error(
        _put(api, "NEAR", [{"sku": "MILK", "quantity": "-1"}]), 422, "invalid_quantity", "items.0.quantity"
    )
    assert_error(
        _put(api, "NEAR", [{"sku": "MILK", "quantity": "0.0001"}]),
        422,
        "invalid_quantity",
        "items.0.quantity",
    )
    assert_error(
        _put(api, "NEAR", [{"sku": "MILK", "quantity": 1.5}]), 422, "invalid_quantity", "items.0.quantity"
    )
    assert created(api.get(f"{ADMIN}/stores/NEAR/stock"), 200)["items"] == []
    assert_error(api.get(f"{ADMIN}/stores/NOPE/stock"), 404, "unknown_store")
    marketer = api.as_key(make_key(db, "marketer"))
    analyst = api.as_key(make_key(db, "analyst"))
    assert _put(marketer, "NEAR", [{"sku": "MILK", "quantity": "1"}]).status_code == 200
    assert_error(_put(analyst, "NEAR", [{"sku": "MILK", "quantity": "2"}]), 403, "forbidden")
    assert analyst.get(f"{ADMIN}/stores/NEAR/stock").status_code == 200


def test_availability_nearest_first(api: Api) -> None:
    _setup(api)
    for code in ("SPB", "FAR", "NEAR", "WEB", "CLOSED"):
        created(_put(api, code, [{"sku": "MILK", "quantity": "5"}, {"sku": "TEA", "quantity": "0"}]), 200)
    created(api.patch(f"{ADMIN}/stores/CLOSED", json={"active": False}), 200)
    url = f"{ADMIN}/products/MILK/availability"
    items = created(api.get(url, params=HERE), 200)["items"]
    # Closed stores are left out; stores without coordinates come last.
    assert [a["store"] for a in items] == ["NEAR", "FAR", "SPB", "WEB"]
    assert (
        0.5 < items[0]["distance_km"] < 1.5
        and 6.5 < items[1]["distance_km"] < 7.5
        and items[3]["distance_km"] is None
    )
    assert items[0]["quantity"] == "5.000"
    assert [a["store"] for a in created(api.get(url, params={**HERE, "limit": 2}), 200)["items"]] == [
        "NEAR",
        "FAR",
    ]
    no_point = created(api.get(url), 200)["items"]
    assert [a["store"] for a in no_point] == ["FAR", "NEAR", "SPB", "WEB"] and no_point[0][
        "distance_km"
    ] is None
    assert (
        created(api.get(f"{ADMIN}/products/TEA/availability", params=HERE), 200)["items"] == []
    )  # quantity 0
    assert_error(api.get(url, params={"lat": 55.7}), 400, "incomplete_coordinates", "lon")
    assert_error(api.get(url, params={"lat": 95, "lon": 1}), 400, "invalid_latitude", "lat")
    assert_error(api.get(url, params={"lat": 5, "lon": 181}), 400, "invalid_longitude", "lon")
    assert_error(api.get(url, params={"limit": 0}), 400, "invalid_limit", "limit")
    assert_error(api.get(f"{ADMIN}/products/NOPE/availability"), 404, "unknown_product")
