"""Every condition family, compiled and run on DuckDB and on ClickHouse (chdb): both engines
select exactly the expected members. Invalid trees are refused with the path of the bad node."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from omniloyal.analytics.warehouse import ChdbWarehouse, Warehouse, open_warehouse
from omniloyal.segments import compiler, tables
from tests.segments.data import NOW, fill

MOSCOW = {"type": "profile", "field": "city", "op": "eq", "value": "Moscow"}
FEMALE = {"type": "profile", "field": "gender", "op": "eq", "value": "female"}

# (id, tree, members expected among 1..4; member 5 was merged into 1 and never appears)
CASES: list[tuple[str, dict[str, Any], set[int]]] = [
    # groups
    ("all-empty", {"all": []}, {1, 2, 3, 4}),
    (
        "any",
        {
            "any": [
                {"type": "profile", "field": "gender", "op": "eq", "value": "male"},
                {"not": {"type": "purchases"}},
            ]
        },
        {2, 3, 4},
    ),
    ("not", {"not": MOSCOW}, {2, 3}),
    # questionnaire
    ("city-eq", MOSCOW, {1, 4}),
    ("city-neq", {"type": "profile", "field": "city", "op": "neq", "value": "Moscow"}, {2, 3}),
    ("city-exists", {"type": "profile", "field": "city", "op": "exists"}, {1, 2, 4}),
    ("city-missing", {"type": "profile", "field": "city", "op": "not_exists"}, {3}),
    ("gender-in", {"type": "profile", "field": "gender", "op": "in", "value": ["female"]}, {1, 3}),
    ("age-gte", {"type": "profile", "field": "age", "op": "gte", "value": 40}, {2}),
    ("age-eq-birthday-today", {"type": "profile", "field": "age", "op": "eq", "value": 26}, {4}),
    ("age-lt", {"type": "profile", "field": "age", "op": "lt", "value": 26}, set()),
    ("age-between", {"type": "profile", "field": "age", "op": "between", "value": [30, 40]}, {1}),
    ("birth-month", {"type": "profile", "field": "birth_month", "op": "in", "value": [5]}, {1}),
    (
        "registered-recently",
        {"type": "profile", "field": "registered_days", "op": "lte", "value": 30},
        {2, 3},
    ),
    ("registered-long-ago", {"type": "profile", "field": "registered_days", "op": "gt", "value": 30}, {1, 4}),
    ("has-children", {"type": "profile", "field": "has_children", "value": True}, {2, 4}),
    ("no-children", {"type": "profile", "field": "has_children", "value": False}, {1, 3}),
    ("children-count", {"type": "profile", "field": "children_count", "op": "gte", "value": 2}, {4}),
    ("pets", {"type": "profile", "field": "pets", "op": "contains", "value": ["cat", "dog"]}, {1, 4}),
    ("no-pets", {"type": "profile", "field": "pets", "op": "not_exists"}, {2, 3}),
    (
        "preferred",
        {"type": "profile", "field": "preferred_categories", "op": "contains", "value": ["Food"]},
        {1},
    ),
    # custom attributes
    ("attr-number", {"type": "attribute", "code": "level", "op": "gte", "value": 3}, {1, 4}),
    ("attr-number-lt", {"type": "attribute", "code": "level", "op": "lt", "value": 3}, {2}),
    ("attr-number-eq", {"type": "attribute", "code": "level", "op": "eq", "value": 5}, {4}),
    ("attr-bool", {"type": "attribute", "code": "vip", "op": "eq", "value": True}, {1}),
    ("attr-bool-neq", {"type": "attribute", "code": "vip", "op": "neq", "value": True}, {2, 3, 4}),
    ("attr-in", {"type": "attribute", "code": "tier", "op": "in", "value": ["gold", "silver"]}, {1, 4}),
    ("attr-missing", {"type": "attribute", "code": "tier", "op": "not_exists"}, {2, 3}),
    # contacts and consent
    ("phone-present", {"type": "contact", "channel": "phone", "state": "present"}, {1, 3, 4}),
    ("phone-missing", {"type": "contact", "channel": "phone", "state": "missing"}, {2}),
    ("phone-valid", {"type": "contact", "channel": "phone", "state": "valid"}, {1, 3, 4}),
    ("phone-mobile", {"type": "contact", "channel": "phone", "state": "mobile"}, {1, 4}),
    ("email-invalid", {"type": "contact", "channel": "email", "state": "invalid"}, {3}),
    ("consent-email", {"type": "consent", "channel": "email"}, {1, 4}),
    ("consent-email-not", {"type": "consent", "channel": "email", "granted": False}, {2, 3}),
    ("consent-sms", {"type": "consent", "channel": "sms"}, {2}),
    ("consent-category", {"type": "consent", "channel": "news"}, {2}),
    ("consent-category-not", {"type": "consent", "channel": "news", "granted": False}, {1, 3, 4}),
    # purchases
    ("bought", {"type": "purchases"}, {1, 2, 4}),
    ("never-bought", {"type": "purchases", "metric": "count", "op": "eq", "value": 0}, {3}),
    ("count", {"type": "purchases", "metric": "count", "op": "gte", "value": 2}, {1, 4}),
    (
        "count-period",
        {"type": "purchases", "metric": "count", "op": "gte", "value": 2, "period": {"days": 30}},
        {4},
    ),
    (
        "count-between-times",
        {
            "type": "purchases",
            "period": {"from": "2026-01-01T00:00:00+00:00", "to": "2026-02-20T00:00:00+03:00"},
        },
        {1},
    ),
    ("sum", {"type": "purchases", "metric": "sum", "op": "gte", "value": "500"}, {1}),
    ("sum-includes-nobuyers", {"type": "purchases", "metric": "sum", "op": "lt", "value": 100}, {2, 3, 4}),
    ("avg", {"type": "purchases", "metric": "avg", "op": "gte", "value": 100}, {1}),
    ("avg-low", {"type": "purchases", "metric": "avg", "op": "lt", "value": "40.00"}, {4}),
    ("sku", {"type": "purchases", "skus": ["MILK"]}, {1, 2}),
    ("category-and-subcategories", {"type": "purchases", "categories": ["Food"]}, {1, 2, 4}),
    ("category-period", {"type": "purchases", "categories": ["Food / Dairy"], "period": {"days": 30}}, {1}),
    ("category-cancelled-only", {"type": "purchases", "categories": ["Drinks"]}, set()),
    ("group", {"type": "purchases", "groups": ["dairy"]}, {1, 2}),
    (
        "sku-sum-net-of-refunds",
        {"type": "purchases", "metric": "sum", "op": "gte", "value": 30, "skus": ["BREAD"]},
        {4},
    ),
    ("store", {"type": "purchases", "stores": ["S3"]}, {4}),
    ("store-format", {"type": "purchases", "store_formats": ["Hypermarket"]}, {1}),
    ("channel", {"type": "purchases", "channels": ["online_store"]}, {1}),
    (
        "days-since-last-gte",
        {"type": "purchases", "metric": "days_since_last", "op": "gte", "value": 30},
        {2},
    ),
    (
        "days-since-last-lte",
        {"type": "purchases", "metric": "days_since_last", "op": "lte", "value": 5},
        {1, 4},
    ),
    ("days-since-last-eq", {"type": "purchases", "metric": "days_since_last", "op": "eq", "value": 5}, {4}),
    (
        "days-since-first",
        {"type": "purchases", "metric": "days_since_first", "op": "gte", "value": 40},
        {1, 2},
    ),
    # events
    (
        "event-property",
        {"type": "events", "event": "product_view", "properties": [{"name": "sku", "value": "MILK"}]},
        {2},
    ),
    ("event-count", {"type": "events", "event": "page_view", "op": "gte", "value": 3}, {3}),
    (
        "event-window",
        {"type": "events", "event": "page_view", "period": {"days": 2}, "sources": ["web"]},
        {2, 3},
    ),
    ("event-none", {"type": "events", "event": ["page_view"], "op": "lt", "value": 1}, {1}),
    ("event-source", {"type": "events", "event": "page_view", "sources": ["mobile_app"]}, {4}),
    (
        "event-days-since",
        {"type": "events", "event": "page_view", "metric": "days_since_last", "op": "lte", "value": 1},
        {2, 3},
    ),
    (
        "event-json-properties",
        {
            "type": "events",
            "event": "custom",
            "properties": [{"name": "name", "value": "quiz"}, {"name": "score", "op": "gte", "value": 5}],
        },
        {1},
    ),
    (
        "event-json-lt",
        {"type": "events", "event": "custom", "properties": [{"name": "score", "op": "lt", "value": 5}]},
        {2},
    ),
    # web
    ("visited-site", {"type": "web", "action": "visited_site"}, {1, 2, 3}),
    ("visited-site-week", {"type": "web", "action": "visited_site", "period": {"days": 7}}, {2, 3}),
    ("visited-section", {"type": "web", "action": "visited_section", "values": ["sale"]}, {3}),
    ("viewed-product", {"type": "web", "action": "viewed_product", "values": ["MILK"]}, {2}),
    ("viewed-category-under", {"type": "web", "action": "viewed_category", "values": ["Food"]}, {1}),
    ("visits-min-count", {"type": "web", "action": "visited_site", "min_count": 3}, {3}),
    # communications
    ("opened", {"type": "message", "action": "opened"}, {1}),
    ("received-campaign", {"type": "message", "action": "received", "campaigns": ["spring"]}, {2}),
    ("clicked", {"type": "message", "action": "clicked"}, {4}),
    ("unsubscribed", {"type": "message", "action": "unsubscribed"}, {4}),
    ("complained", {"type": "message", "action": "complained"}, set()),
    ("opened-other-campaign", {"type": "message", "action": "opened", "campaigns": ["summer"]}, set()),
    # loyalty
    ("balance", {"type": "balance", "currency": "bonus", "op": "gte", "value": 100}, {1}),
    (
        "balance-low-includes-zero",
        {"type": "balance", "currency": "bonus", "op": "lt", "value": 100},
        {2, 3, 4},
    ),
    ("card-state", {"type": "card", "states": ["activated"]}, {1, 2}),
    ("card-blocked", {"type": "card", "blocked": True}, {2}),
    ("card-active-unblocked", {"type": "card", "states": ["activated"], "blocked": False}, {1}),
    ("audience", {"type": "audience", "audiences": ["vip"]}, {1, 4}),
    ("not-audience", {"not": {"type": "audience", "audiences": ["vip"]}}, {2, 3}),
    ("status", {"type": "status", "statuses": ["blocked"]}, {4}),
    # RFM
    ("rfm-group", {"type": "rfm", "groups": ["best"]}, {1}),
    ("rfm-r", {"type": "rfm", "r": [1]}, {2}),
    ("rfm-cells", {"type": "rfm", "r": [4, 5], "f": [4, 5]}, {1, 4}),
    ("rfm-m", {"type": "rfm", "m": [1, 2]}, {2, 4}),
    # other segments
    (
        "segment",
        {
            "all": [
                {"type": "segment", "segment": 10},
                {"type": "profile", "field": "gender", "op": "eq", "value": "male"},
            ]
        },
        {4},
    ),
    ("not-segment", {"not": {"type": "segment", "segment": 10}}, {2, 3}),
    ("nested-segments", {"type": "segment", "segment": 11}, {1, 4}),
    # purchase conditions over the same rows share one scan (unless one holds for non-buyers)
    (
        "same-rows-fused",
        {
            "all": [
                {"type": "purchases", "metric": "count", "op": "gte", "value": 2},
                {"type": "purchases", "metric": "avg", "op": "gte", "value": 10},
                {"type": "purchases", "metric": "days_since_last", "op": "lte", "value": 5},
            ]
        },
        {1, 4},
    ),
    (
        "same-rows-not-fused-with-zero",
        {"all": [{"type": "purchases"}, {"type": "purchases", "metric": "sum", "op": "lt", "value": 100}]},
        {2, 4},
    ),
    # conditions on the member row narrow the subqueries beside them (exactly, negations too)
    ("scoped-negation", {"all": [FEMALE, {"not": {"type": "purchases"}}]}, {3}),
    ("scoped-zero", {"all": [FEMALE, {"type": "purchases", "metric": "sum", "op": "lt", "value": 100}]}, {3}),
    (
        "scoped-nested",
        {
            "all": [
                {"type": "profile", "field": "gender", "op": "eq", "value": "male"},
                {"any": [{"not": {"type": "purchases", "metric": "sum", "op": "lt", "value": 100}}, MOSCOW]},
            ]
        },
        {4},
    ),
    # a typical five-condition segment
    (
        "five-conditions",
        {
            "all": [
                MOSCOW,
                {"type": "profile", "field": "age", "op": "gte", "value": 18},
                {"type": "purchases", "period": {"days": 365}},
                {"type": "purchases", "metric": "sum", "op": "gte", "value": 10},
                {"type": "consent", "channel": "email"},
            ]
        },
        {1, 4},
    ),
]

CONTEXT = compiler.Context(
    now=NOW,
    segments={
        10: compiler.parse(MOSCOW),
        11: compiler.parse({"all": [{"type": "segment", "segment": 10}, {"type": "purchases"}]}),
    },
    store_formats={"Hypermarket": ["S2"]},
    groups={"dairy": ["MILK"]},
)


@pytest.fixture(scope="module", params=["duckdb", "chdb"])
def loaded(request: pytest.FixtureRequest) -> Iterator[Warehouse]:
    url = "duckdb:///:memory:" if request.param == "duckdb" else f"chdb://?database=c_{uuid.uuid4().hex[:12]}"
    wh = open_warehouse(url)
    fill(wh)
    yield wh
    tables.forget(wh)
    if isinstance(wh, ChdbWarehouse):
        wh.drop_database()
    wh.close()


def select(wh: Warehouse, tree: dict[str, Any]) -> set[int]:
    target = compiler.Target("clickhouse" if wh.dialect == "clickhouse" else "duckdb", tables.database(wh))
    sql = compiler.members_sql(compiler.parse(tree), target, CONTEXT)
    return {r["member_id"] for r in wh.query(tables.escape(sql))}


@pytest.mark.parametrize(("tree", "expected"), [pytest.param(t, e, id=i) for i, t, e in CASES])
def test_condition_selects_the_expected_members_on_both_engines(
    loaded: Warehouse, tree: dict[str, Any], expected: set[int]
) -> None:
    assert select(loaded, tree) == expected


def test_count_and_restriction_to_some_members_agree_with_the_member_list(loaded: Warehouse) -> None:
    target = compiler.Target(
        "clickhouse" if loaded.dialect == "clickhouse" else "duckdb", tables.database(loaded)
    )
    node = compiler.parse({"any": [MOSCOW, {"type": "purchases", "skus": ["MILK"]}]})
    assert loaded.scalar(tables.escape(compiler.count_sql(node, target, CONTEXT))) == 3
    only = compiler.members_sql(node, target, CONTEXT, only=[2, 3])
    assert {r["member_id"] for r in loaded.query(tables.escape(only))} == {2}


def test_values_with_quotes_and_braces_are_literals_not_sql(loaded: Warehouse) -> None:
    tree = {"type": "profile", "field": "city", "op": "in", "value": ["O'Hare {x} $y \\", "Moscow"]}
    assert select(loaded, tree) == {1, 4}


def test_purchase_conditions_on_the_same_rows_share_one_scan() -> None:
    node = compiler.parse(
        {
            "all": [
                {"type": "purchases", "metric": "count", "op": "gte", "value": 2, "period": {"days": 365}},
                {"type": "purchases", "metric": "sum", "op": "gte", "value": 100, "period": {"days": 365}},
                {"type": "purchases", "metric": "sum", "op": "gte", "value": 100, "period": {"days": 30}},
            ]
        }
    )
    sql = compiler.members_sql(node, compiler.Target(), CONTEXT)
    assert sql.count("FROM purchases") == 2


def test_row_conditions_narrow_the_aggregates_beside_them() -> None:
    """ "Women in Moscow with a purchase this year" groups the purchases of women in Moscow only."""
    node = compiler.parse({"all": [MOSCOW, FEMALE, {"type": "purchases", "period": {"days": 365}}]})
    sql = compiler.members_sql(node, compiler.Target(), CONTEXT)
    purchases = sql[sql.index("FROM purchases") :]
    assert "IN (SELECT m.member_id FROM members AS m WHERE" in purchases and "'female'" in purchases
    lone = {"type": "purchases", "period": {"days": 365}}
    alone = compiler.members_sql(compiler.parse(lone), compiler.Target(), CONTEXT)
    assert "FROM members AS m WHERE" not in alone[alone.index("FROM purchases") :]


def test_all_time_conditions_on_every_purchase_read_the_kept_sums() -> None:
    """ "LTV over 10,000", "bought at least once": the member's kept sums, not every purchase."""
    for tree in (
        {"type": "purchases"},
        {"type": "purchases", "metric": "sum", "op": "gte", "value": 10000},
        {"type": "purchases", "metric": "days_since_first", "op": "gte", "value": 40},
    ):
        sql = compiler.members_sql(compiler.parse(tree), compiler.Target(), CONTEXT)
        assert "FROM member_features" in sql and "FROM purchases" not in sql
    narrowed = compiler.members_sql(
        compiler.parse({"type": "purchases", "channels": ["online_store"]}), compiler.Target(), CONTEXT
    )
    assert "FROM purchases" in narrowed


@pytest.mark.parametrize(("tree", "expected"), [pytest.param(t, e, id=i) for i, t, e in CASES])
def test_the_kept_sums_select_what_grouping_the_purchases_selects(
    loaded: Warehouse, tree: dict[str, Any], expected: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiler, "_from_features", lambda node: False)
    assert select(loaded, tree) == expected


def test_the_sql_is_built_for_both_dialects() -> None:
    sql = compiler.explain(
        {"all": [MOSCOW, {"type": "events", "event": "page_view", "period": {"days": 7}}]}, NOW
    )
    assert "FINAL" in sql["clickhouse"] and "omniloyal.events" in sql["clickhouse"]
    assert "FINAL" not in sql["duckdb"] and "toDateTime64" not in sql["duckdb"]


# ---------------------------------------------------------------- refusals

REFUSALS: list[tuple[str, Any, str, str]] = [
    ("not-an-object", [], "conditions", "invalid_condition"),
    ("unknown-type", {"type": "horoscope"}, "conditions.type", "unknown_condition"),
    (
        "deep-path",
        {
            "all": [
                MOSCOW,
                MOSCOW,
                {"any": [{"type": "profile", "field": "age", "op": "gte", "value": "old"}]},
            ]
        },
        "conditions.all[2].any[0].value",
        "invalid_value",
    ),
    (
        "bad-op",
        {"type": "profile", "field": "city", "op": "gte", "value": "A"},
        "conditions.op",
        "invalid_choice",
    ),
    (
        "bad-field",
        {"type": "profile", "field": "shoe_size", "op": "eq", "value": 1},
        "conditions.field",
        "invalid_choice",
    ),
    (
        "unknown-key",
        {"type": "consent", "channel": "sms", "colour": "red"},
        "conditions.colour",
        "unknown_field",
    ),
    ("empty-any", {"not": {"any": []}}, "conditions.not.any", "empty_group"),
    ("group-with-extra", {"all": [], "type": "profile"}, "conditions.type", "unknown_field"),
    (
        "missing-value",
        {"type": "balance", "currency": "bonus", "op": "gte"},
        "conditions.value",
        "missing_field",
    ),
    (
        "money-precision",
        {"type": "purchases", "metric": "sum", "value": "1.005"},
        "conditions.value",
        "invalid_value",
    ),
    ("period-days", {"type": "purchases", "period": {"days": 0}}, "conditions.period.days", "invalid_value"),
    (
        "period-naive",
        {"type": "purchases", "period": {"from": "2026-01-01T00:00:00"}},
        "conditions.period.from",
        "invalid_value",
    ),
    (
        "between-order",
        {"type": "profile", "field": "age", "op": "between", "value": [40, 20]},
        "conditions.value",
        "invalid_value",
    ),
    (
        "month",
        {"type": "profile", "field": "birth_month", "op": "eq", "value": 13},
        "conditions.value",
        "invalid_value",
    ),
    ("rfm-score", {"type": "rfm", "r": [0]}, "conditions.r[0]", "invalid_value"),
    ("rfm-group", {"type": "rfm", "groups": ["vip"]}, "conditions.groups[0]", "invalid_choice"),
    ("rfm-empty", {"type": "rfm"}, "conditions", "missing_field"),
    ("card-empty", {"type": "card"}, "conditions.states", "missing_field"),
    ("segment-id", {"type": "segment", "segment": "ten"}, "conditions.segment", "invalid_value"),
    (
        "property-filter",
        {"type": "events", "event": "x", "properties": [{"name": "a", "op": "like"}]},
        "conditions.properties[0].op",
        "invalid_choice",
    ),
    (
        "mobile-email",
        {"type": "contact", "channel": "email", "state": "mobile"},
        "conditions.state",
        "invalid_choice",
    ),
    (
        "too-deep",
        {
            "not": {
                "not": {
                    "not": {
                        "not": {
                            "not": {
                                "not": {"not": {"not": {"not": {"not": {"not": {"not": {"not": MOSCOW}}}}}}}
                            }
                        }
                    }
                }
            }
        },
        "conditions" + ".not" * 13,
        "too_deep",
    ),
]


@pytest.mark.parametrize(("tree", "path", "code"), [pytest.param(t, p, c, id=i) for i, t, p, c in REFUSALS])
def test_invalid_trees_are_refused_with_the_path_of_the_bad_node(tree: Any, path: str, code: str) -> None:
    with pytest.raises(compiler.ConditionError) as refused:
        compiler.parse(tree)
    assert (refused.value.path, refused.value.code) == (path, code)
