"""Product groups: explicit lists and rules (pure matching and resolved membership)."""

from __future__ import annotations

from typing import Any

from omniloyal.catalog.groups import rule_matches
from omniloyal.catalog.service import group_skus, product_facts
from omniloyal.db.engine import Database
from tests.catalog.helpers import ADMIN, audit, created, product
from tests.conftest import Api, assert_error, make_key


def test_rule_matching_is_pure_and_strict() -> None:
    rule = {
        "categories": ["Food / Dairy"],
        "brands": ["A", "B"],
        "attributes": {"fat": ["3.2", "2.5"], "organic": [True]},
        "exclude_skus": ["X"],
    }
    attrs = {"fat": 3.2, "organic": True}
    assert rule_matches(rule, "S", "Food / Dairy / Milk", "A", attrs)
    assert rule_matches(rule, "S", "Food / Dairy", "B", {"fat": "2.50", "organic": "true"})
    assert not rule_matches(rule, "X", "Food / Dairy", "A", attrs)  # excluded
    assert not rule_matches(rule, "S", "Food / DairyX", "A", attrs)  # not a sub-category
    assert not rule_matches(rule, "S", None, "A", attrs)
    assert not rule_matches(rule, "S", "Food / Dairy", "C", attrs)
    assert not rule_matches(rule, "S", "Food / Dairy", None, attrs)
    assert not rule_matches(rule, "S", "Food / Dairy", "A", {"fat": 1.5, "organic": True})
    assert not rule_matches(rule, "S", "Food / Dairy", "A", {"fat": 3.2})  # attribute missing
    assert rule_matches(
        {"attributes": {"tags": ["vegan"]}}, "S", None, None, {"tags": ["gluten-free", "vegan"]}
    )
    assert not rule_matches({"attributes": {"n": [1]}}, "S", None, None, {"n": True})  # true is not 1
    assert rule_matches({}, "S", None, None, {})  # no parts: every product
    assert not rule_matches({"exclude_skus": ["S"]}, "S", None, None, {})


def _members(api: Api, code: str, **params: Any) -> list[str]:
    page = created(api.get(f"{ADMIN}/product-groups/{code}/products", params=params), 200)
    return [p["sku"] for p in page["items"]]


def _catalogue(api: Api) -> None:
    product(api, "MILK", category="Food / Dairy / Milk", brand="A", attributes={"fat": 3.2})
    product(api, "MILK-LIGHT", category="Food / Dairy / Milk", brand="A", attributes={"fat": 1.5})
    product(api, "CHEESE", category="Food / Dairy", brand="B", attributes={"fat": "45"})
    product(api, "BREAD", category="Food / Bakery", brand="A")
    product(api, "SOAP", category="Household", brand="A")


def test_explicit_group(api: Api, db: Database) -> None:
    _catalogue(api)
    body = {"code": "promo", "name": "Promo", "skus": ["SOAP", "MILK", "MILK"]}
    group = created(api.post(f"{ADMIN}/product-groups", json=body))
    assert (group["kind"], group["skus"], group["rule"]) == ("explicit", ["MILK", "SOAP"], None)
    assert api.get(f"{ADMIN}/product-groups/promo").json() == group
    assert _members(api, "promo") == ["MILK", "SOAP"]
    response = api.patch(f"{ADMIN}/product-groups/promo", json={"skus": ["BREAD"], "name": "Bread promo"})
    assert created(response, 200)["skus"] == ["BREAD"]
    with db.reading() as session:
        assert group_skus(session, "promo") == {"BREAD"}
        assert product_facts(session, ["BREAD"])["BREAD"].groups == frozenset({"promo"})
    records = audit(api, "product_group", "promo")
    assert [r["action"] for r in records] == ["update", "create"]
    assert records[0]["before"] == {"name": "Promo", "skus": ["MILK", "SOAP"]}


def test_rule_group(api: Api, db: Database) -> None:
    _catalogue(api)
    rule = {"categories": ["Food / Dairy"], "brands": ["A", "B"], "exclude_skus": ["CHEESE"]}
    group = created(
        api.post(f"{ADMIN}/product-groups", json={"code": "dairy", "name": "Dairy", "rule": rule})
    )
    assert group["kind"] == "rule" and group["skus"] is None
    assert group["rule"] == {**rule, "attributes": {}}
    assert _members(api, "dairy") == ["MILK", "MILK-LIGHT"]
    assert _members(api, "dairy", limit=1) == ["MILK"]
    fat = {"rule": {"categories": ["Food"], "attributes": {"fat": ["3.2", 45]}}}
    created(api.patch(f"{ADMIN}/product-groups/dairy", json=fat), 200)
    assert _members(api, "dairy") == ["MILK", "CHEESE"]
    # Membership follows the catalogue: a new product matching the rule is in at once.
    product(api, "YOGURT", category="Food / Dairy / Yogurt", attributes={"fat": "3.20"})
    assert _members(api, "dairy") == ["MILK", "CHEESE", "YOGURT"]
    with db.reading() as session:
        assert group_skus(session, "dairy") == {"MILK", "CHEESE", "YOGURT"}
        facts = product_facts(session, ["MILK", "SOAP"])
        assert facts["MILK"].groups == frozenset({"dairy"}) and facts["SOAP"].groups == frozenset()
    # And a rule group may become an explicit one.
    assert created(api.patch(f"{ADMIN}/product-groups/dairy", json={"skus": ["SOAP"]}), 200)["rule"] is None
    assert _members(api, "dairy") == ["SOAP"]


def test_rule_group_pages_through_every_match(api: Api) -> None:
    items = [{"sku": f"P{i:02}", "name": "x", "brand": "A" if i % 3 == 0 else "B"} for i in range(20)]
    created(api.post(f"{ADMIN}/products/batch", json={"items": items}), 200)
    created(api.post(f"{ADMIN}/product-groups", json={"code": "a", "name": "A", "rule": {"brands": ["A"]}}))
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = created(api.get(f"{ADMIN}/product-groups/a/products", params=params), 200)
        seen += [p["sku"] for p in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [f"P{i:02}" for i in range(0, 20, 3)]


def test_refusals_and_roles(api: Api, db: Database) -> None:
    _catalogue(api)
    url = f"{ADMIN}/product-groups"
    body = assert_error(
        api.post(url, json={"code": "g", "name": "G", "skus": ["MILK", "NOPE", "GONE"]}),
        404,
        "unknown_product",
        "skus.1",
    )
    assert "NOPE" in body["error"]["message"] and body["error"]["details"]["skus"] == ["NOPE", "GONE"]
    assert_error(api.post(url, json={"code": "g", "name": "G"}), 422, "skus_or_rule")
    assert_error(api.post(url, json={"code": "g", "name": "G", "skus": [], "rule": {}}), 422, "skus_or_rule")
    assert_error(
        api.post(url, json={"code": "g", "name": "G", "rule": {"colour": ["red"]}}),
        422,
        "unknown_field",
        "rule.colour",
    )
    assert_error(
        api.post(url, json={"code": "g", "name": "G", "rule": {"categories": ["a//b"]}}),
        422,
        "invalid_category",
    )
    assert_error(
        api.post(url, json={"code": "g", "name": "G", "rule": {"attributes": {"fat": []}}}),
        422,
        "invalid_attribute",
    )
    assert created(api.get(url), 200)["items"] == []
    created(api.post(url, json={"code": "g", "name": "G", "skus": []}))
    assert_error(api.post(url, json={"code": "g", "name": "G", "skus": []}), 409, "duplicate_code", "code")
    assert_error(api.patch(f"{url}/g", json={"skus": ["MILK"], "rule": {}}), 422, "skus_or_rule")
    assert_error(api.patch(f"{url}/g", json={"skus": None}), 422, "null_not_allowed", "skus")
    assert_error(api.patch(f"{url}/g", json={"skus": ["NOPE"]}), 404, "unknown_product", "skus.0")
    assert_error(api.get(f"{url}/nope"), 404, "unknown_product_group")
    assert_error(api.get(f"{url}/nope/products"), 404, "unknown_product_group")
    marketer = api.as_key(make_key(db, "marketer"))
    analyst = api.as_key(make_key(db, "analyst"))
    assert marketer.post(url, json={"code": "m", "name": "M", "rule": {"brands": ["A"]}}).status_code == 201
    assert_error(analyst.post(url, json={"code": "x", "name": "X", "skus": []}), 403, "forbidden")
    assert_error(analyst.patch(f"{url}/m", json={"name": "x"}), 403, "forbidden")
    assert [g["code"] for g in created(analyst.get(url), 200)["items"]] == ["g", "m"]
