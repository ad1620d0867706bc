"""Products: create, upsert, patch, barcodes, categories on the fly, filters, lookup, batch."""

from __future__ import annotations

from typing import Any

from omniloyal.catalog.service import product_facts, skus_by_barcode
from omniloyal.db.engine import Database
from tests.catalog.helpers import ADMIN, audit, created, product
from tests.conftest import Api, assert_error, make_key


def _skus(api: Api, **params: Any) -> list[str]:
    return [p["sku"] for p in created(api.get(f"{ADMIN}/products", params=params), 200)["items"]]


def test_create_read_and_lookup(api: Api) -> None:
    body = product(
        api,
        "MILK-1",
        price="89.90",
        category="Food / Dairy / Milk",
        brand="Prostokvashino",
        barcodes=["4600000000011", "4600000000028"],
        unit="l",
        attributes={"fat": 3.2, "organic": False},
    )
    assert body["price"] == "89.90" and body["category"] == "Food / Dairy / Milk"
    assert body["barcodes"] == ["4600000000011", "4600000000028"] and body["unit"] == "l"
    assert api.get(f"{ADMIN}/products/MILK-1").json() == body
    assert api.get(f"{ADMIN}/products/lookup", params={"barcode": "4600000000028"}).json() == body
    assert_error(
        api.get(f"{ADMIN}/products/lookup", params={"barcode": "000"}), 404, "unknown_barcode", "barcode"
    )
    assert_error(api.get(f"{ADMIN}/products/NOPE"), 404, "unknown_product")
    # A list of names is the same path; the tree is shared.
    assert product(api, "KEFIR-1", category=["Food", "Dairy", "Kefir"])["category"] == "Food / Dairy / Kefir"
    categories = {c["path"]: c for c in created(api.get(f"{ADMIN}/categories"), 200)["items"]}
    assert list(categories) == ["Food", "Food / Dairy", "Food / Dairy / Milk", "Food / Dairy / Kefir"]
    dairy = categories["Food / Dairy"]
    assert (dairy["name"], dairy["parent"], dairy["depth"]) == ("Dairy", "Food", 1)
    assert (dairy["product_count"], dairy["total_product_count"]) == (0, 2)
    assert categories["Food / Dairy / Milk"]["product_count"] == 1
    assert audit(api, "product", "MILK-1")[0]["after"]["price"] == "89.90"


def test_refusals(api: Api) -> None:
    product(api, "A", barcodes=["111"])

    def post(**fields: Any) -> Any:
        return api.post(f"{ADMIN}/products", json={"sku": "B", "name": "B", **fields})

    assert_error(post(sku="A"), 409, "duplicate_sku", "sku")
    assert_error(post(barcodes=["222", "111"]), 409, "duplicate_barcode", "barcodes.1")
    assert_error(post(price=10.5), 422, "invalid_price", "price")
    assert_error(post(price="-1"), 422, "invalid_price", "price")
    assert_error(post(price="1.005"), 422, "invalid_price", "price")
    assert_error(post(category="Food //Milk"), 422, "invalid_category", "category")
    assert_error(post(category=["Food", "Dairy/Milk"]), 422, "invalid_category", "category")
    assert_error(post(sku="a/b"), 422, "invalid_sku", "sku")
    assert_error(post(barcodes=["12 34"]), 422, "invalid_barcode", "barcodes.0")
    assert_error(post(attributes={"": 1}), 422, "invalid_attribute", "attributes")
    assert_error(api.post(f"{ADMIN}/products", json={"sku": "B"}), 422, "missing_field", "name")
    assert _skus(api) == ["A"]
    assert created(api.get(f"{ADMIN}/categories"), 200)["items"] == []


def test_put_upserts_and_patch_is_partial(api: Api) -> None:
    response = api.put(f"{ADMIN}/products/P1", json={"name": "Tea", "price": "100", "barcodes": ["1", "2"]})
    assert created(response, 201)["price"] == "100.00"
    # PUT replaces the whole product: what is left out goes back to its default.
    replaced = created(
        api.put(f"{ADMIN}/products/P1", json={"name": "Green tea", "brand": "Greenfield"}), 200
    )
    assert (replaced["name"], replaced["price"], replaced["barcodes"]) == ("Green tea", None, [])
    assert_error(api.put(f"{ADMIN}/products/P1", json={"sku": "P2", "name": "x"}), 400, "sku_mismatch", "sku")
    assert_error(api.put(f"{ADMIN}/products/a%20b", json={"name": "x"}), 400, "invalid_sku", "sku")
    patched = created(api.patch(f"{ADMIN}/products/P1", json={"price": "120.5", "barcodes": ["3"]}), 200)
    assert (patched["name"], patched["brand"], patched["price"], patched["barcodes"]) == (
        "Green tea",
        "Greenfield",
        "120.50",
        ["3"],
    )
    assert created(api.patch(f"{ADMIN}/products/P1", json={"brand": None}), 200)["brand"] is None
    assert_error(api.patch(f"{ADMIN}/products/P1", json={"name": None}), 422, "null_not_allowed", "name")
    assert_error(api.patch(f"{ADMIN}/products/NOPE", json={"name": "x"}), 404, "unknown_product")
    # The barcode given up by P1 is free again.
    assert product(api, "P2", barcodes=["1"])["barcodes"] == ["1"]
    actions = [r["action"] for r in audit(api, "product", "P1")]
    assert actions == ["update", "update", "update", "create"]


def test_list_filters(api: Api) -> None:
    product(api, "MILK", name="Milk 3.2%", category="Food / Dairy / Milk", brand="A")
    product(api, "CHEESE", name="Cheese", category="Food / Dairy", brand="B")
    product(api, "BREAD", name="Rye bread", category="Food / Bakery", brand="A")
    product(api, "SOAP", name="Soap", category="Household")
    product(api, "DAIRYX", name="Oddity", category="Food / DairyX")
    assert _skus(api, category="Food / Dairy") == ["MILK", "CHEESE"]  # sub-categories too, not DairyX
    assert _skus(api, category="Food/Dairy/Milk") == ["MILK"]
    assert _skus(api, category="Food") == ["MILK", "CHEESE", "BREAD", "DAIRYX"]
    assert _skus(api, category="food") == []
    assert _skus(api, brand="A") == ["MILK", "BREAD"]
    assert _skus(api, q="BREAD") == ["BREAD"]
    assert _skus(api, q="3.2%") == ["MILK"]
    assert _skus(api, q="%") == ["MILK"]  # wildcards are literal
    assert _skus(api, category="Food", brand="A", q="milk") == ["MILK"]
    assert_error(
        api.get(f"{ADMIN}/products", params={"category": "a//b"}), 400, "invalid_category", "category"
    )
    page = created(api.get(f"{ADMIN}/products", params={"limit": 3}), 200)
    rest = created(api.get(f"{ADMIN}/products", params={"limit": 3, "cursor": page["next_cursor"]}), 200)
    assert [p["sku"] for p in page["items"] + rest["items"]] == ["MILK", "CHEESE", "BREAD", "SOAP", "DAIRYX"]
    assert rest["next_cursor"] is None


def test_batch_keeps_valid_items_and_reports_the_others(api: Api, db: Database) -> None:
    product(api, "OLD", barcodes=["999"], price="5")
    items: list[Any] = [
        {"sku": "N1", "name": "New one", "price": "10", "category": "Food / Tea", "barcodes": ["100"]},
        {"sku": "N2", "name": "Bad price", "price": 1.5},
        {"sku": "N3", "name": "Taken barcode", "barcodes": ["999"]},
        {"sku": "OLD", "name": "Old renamed", "price": "5"},
        {"sku": "N1", "name": "Twice"},
        "not an object",
        {"sku": "N4"},
        {"sku": "N5", "name": "Takes N1's barcode", "barcodes": ["100"]},
        {"sku": "N6", "name": "Fine", "brand": "X"},
    ]
    result = created(api.post(f"{ADMIN}/products/batch", json={"items": items}), 200)
    assert (result["accepted"], result["created"], result["updated"], result["unchanged"]) == (3, 2, 1, 0)
    errors = {e["index"]: (e["code"], e["field"]) for e in result["errors"]}
    assert errors == {
        1: ("invalid_price", "price"),
        2: ("duplicate_barcode", "barcodes.0"),
        4: ("duplicate_in_batch", "sku"),
        5: ("invalid_item", None),
        6: ("missing_field", "name"),
        7: ("duplicate_barcode", "barcodes.0"),
    }
    assert all(e["message"] for e in result["errors"])
    assert _skus(api) == ["OLD", "N1", "N6"]
    assert api.get(f"{ADMIN}/products/OLD").json()["barcodes"] == []  # a batch item is the whole product
    again = created(api.post(f"{ADMIN}/products/batch", json={"items": [items[0]]}), 200)
    assert (again["accepted"], again["unchanged"], again["errors"]) == (1, 1, [])
    assert_error(
        api.post(f"{ADMIN}/products/batch", json={"items": [{}] * 1001}), 422, "too_many_items", "items"
    )
    with db.reading() as session:
        assert skus_by_barcode(session, ["100", "nope"]) == {"100": "N1"}
        facts = product_facts(session, ["N1", "nope"])
        assert list(facts) == ["N1"] and facts["N1"].category_path == "Food / Tea"


def test_large_batch(api: Api) -> None:
    items = [
        {
            "sku": f"S{i}",
            "name": f"P{i}",
            "price": "1.50",
            "category": f"C{i % 7} / D{i % 3}",
            "barcodes": [f"B{i}"],
        }
        for i in range(1000)
    ]
    result = created(api.post(f"{ADMIN}/products/batch", json={"items": items}), 200)
    assert result["created"] == 1000 and result["errors"] == []
    assert len(created(api.get(f"{ADMIN}/categories", params={"limit": 500}), 200)["items"]) == 7 + 21
    assert api.get(f"{ADMIN}/products/lookup", params={"barcode": "B999"}).json()["sku"] == "S999"


def test_roles(api: Api, db: Database) -> None:
    marketer = api.as_key(make_key(db, "marketer"))
    operator = api.as_key(make_key(db, "operator"))
    assert marketer.post(f"{ADMIN}/products", json={"sku": "M1", "name": "By marketer"}).status_code == 201
    assert marketer.patch(f"{ADMIN}/products/M1", json={"price": "1"}).status_code == 200
    assert marketer.post(f"{ADMIN}/products/batch", json={"items": []}).status_code == 200
    assert_error(operator.post(f"{ADMIN}/products", json={"sku": "O1", "name": "x"}), 403, "forbidden")
    assert_error(operator.put(f"{ADMIN}/products/M1", json={"name": "x"}), 403, "forbidden")
    assert operator.get(f"{ADMIN}/products/M1").status_code == 200
    assert operator.get(f"{ADMIN}/categories").status_code == 200
    assert audit(api, "product", "M1")[-1]["actor"].startswith("marketer:")
