"""The offers admin API: strict validation of every filter and action, the life cycle with its
history, counters, roles, and the engine snapshot seeing changes at once."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest
from sqlalchemy import select, update

from omniloyal.catalog.models import Category, LegalEntity, PaymentMethod, Product, ProductGroup, Store
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.ledger.models import Currency
from omniloyal.members.models import AttributeDefinition, Card, Member
from omniloyal.offers import engine
from omniloyal.offers.models import Offer, OfferStatusChange
from omniloyal.offers.service import offer_ids_active_at
from omniloyal.offers.snapshot import active_snapshot, record_use
from tests.conftest import Api, assert_error, make_key

OFFERS = "/api/v1/admin/offers"
MONDAY_NOON = datetime(2026, 11, 23, 12, 0)


def seed(db: Database, api: Api) -> None:
    """The reference data offers point at: stores, payment methods, products, a card..."""
    with db.transaction() as s:
        entity = LegalEntity(code="LE1", name="Main entity", is_default=True)
        s.add(entity)
        s.flush()
        for code, channel, fmt in (("HYPER1", "offline", "Hypermarket"), ("WEB", "online_store", None)):
            attributes = {"CustomTradeFormat": fmt} if fmt else {}
            s.add(
                Store(
                    code=code,
                    name=code,
                    legal_entity_id=entity.id,
                    channel=channel,
                    timezone="Europe/Moscow",
                    attributes=attributes,
                )
            )
        s.add_all(
            [PaymentMethod(code="online", name="Online payment"), PaymentMethod(code="cash", name="Cash")]
        )
        dairy = Category(path="Dairy", name="Dairy", depth=0)
        s.add(dairy)
        s.flush()
        s.add(Product(sku="MILK", name="Milk", category_id=dairy.id, brand="Farm"))
        s.add(ProductGroup(code="dairy", name="Dairy", kind="explicit"))
        s.add(Currency(code="stars", name="Stars", precision=0))
        s.add(AttributeDefinition(code="level", name="Level", type="integer", constraints={}))
        member = Member(first_name="Ann")
        s.add(member)
        s.flush()
        s.add(Card(number="1000200030004000", member_id=member.id, kind="physical", state="activated"))
    assert api.post("/api/v1/admin/audiences", json={"code": "vip", "name": "VIP"}).status_code == 201


# The three offers of the seed documents.
HYPERMARKET_10 = {
    "name": "10% in hypermarkets",
    "priority": 10,
    "chains": [
        {
            "event": "discount_calculation",
            "filters": [{"type": "stores", "attribute": "CustomTradeFormat", "values": ["Hypermarket"]}],
            "actions": [{"type": "discount", "kind": "percent", "value": "10"}],
        }
    ],
}
ONLINE_PAYMENT_100 = {
    "name": "100 points for paying online",
    "summable": True,
    "chains": [
        {
            "event": "bonus_calculation",
            "filters": [{"type": "payment_method", "methods": ["online"]}],
            "actions": [{"type": "bonus", "kind": "fixed", "value": "100"}],
        }
    ],
}
APP_INSTALLED_100 = {
    "name": "100 points for installing the app",
    "chains": [
        {
            "event": "mobile_app_installed",
            "actions": [
                {"type": "extra_bonus", "value": "100", "currency": "bonus", "legal_entity": "LE1"},
                {"type": "cheque_message", "text": "Thank you, {first_name}!"},
            ],
        }
    ],
}


def create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(OFFERS, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def set_status(api: Api, offer_id: int, status: str) -> Any:
    return api.post(f"{OFFERS}/{offer_id}/status", json={"status": status})


def test_seed_offers_are_stored_as_drafts_and_priced_by_the_engine_once_active(
    api: Api, db: Database
) -> None:
    seed(db, api)
    hyper, online, app = (
        create(api, body) for body in (HYPERMARKET_10, ONLINE_PAYMENT_100, APP_INSTALLED_100)
    )
    assert {o["status"] for o in (hyper, online, app)} == {"draft"}
    # Stored JSON: decimals as strings, defaults spelled out, absent parameters left out.
    assert hyper["chains"][0]["actions"] == [{"type": "discount", "kind": "percent", "value": "10"}]
    assert hyper["chains"][0]["filters"][0]["exclude"] is False
    assert "currency" not in online["chains"][0]["actions"][0]
    assert (hyper["spent_points"], hyper["uses"], hyper["budget_money"]) == ("0.00", 0, None)
    for offer in (hyper, online, app):
        assert set_status(api, offer["id"], "active").status_code == 200

    with db.reading() as session:
        snapshot = active_snapshot(session)
    assert {o.id for o in snapshot.offers} == {hyper["id"], online["id"], app["id"]}
    lines = (engine.Line(1, "MILK", D("200"), D("1"), D("200")),)
    in_hyper = engine.calculate(
        snapshot,
        engine.Cheque(
            MONDAY_NOON,
            "HYPER1",
            "offline",
            {"CustomTradeFormat": "Hypermarket"},
            lines,
            (engine.Payment("online", D("180")),),
        ),
    )
    assert in_hyper.discount_total == D("20.00")
    assert in_hyper.bonus_total() == {"bonus": D("100.00")}
    cash_elsewhere = engine.calculate(
        snapshot,
        engine.Cheque(MONDAY_NOON, "WEB", "online_store", {}, lines, (engine.Payment("cash", D(200)),)),
    )
    assert cash_elsewhere.discount_total == 0 and cash_elsewhere.accruals == []
    installed = engine.evaluate_member_event(
        snapshot,
        engine.MemberEvent(
            "mobile_app_installed", MONDAY_NOON, engine.MemberFacts(1, attributes={"first_name": "Ann"})
        ),
    )
    assert [(a.amount, a.legal_entity) for a in installed.accruals] == [(D("100.00"), "LE1")]
    assert installed.cheque_messages == ["Thank you, Ann!"]


def chain(
    event: str, filters: list[dict[str, Any]], actions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    default = {
        "discount_calculation": {"type": "discount", "value": "5"},
        "write_off": {"type": "write_off_rule", "max_percent": "50"},
        "bonus_calculation": {"type": "bonus", "value": "3"},
    }.get(event, {"type": "extra_bonus", "value": "10"})
    return {"event": event, "filters": filters, "actions": actions or [default]}


def offer_with(*chains: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": "Test offer", "chains": list(chains), **fields}


def on_cheque(*filters: dict[str, Any]) -> dict[str, Any]:
    return offer_with(chain("discount_calculation", list(filters)))


def with_action(event: str, *actions: dict[str, Any]) -> dict[str, Any]:
    return offer_with(chain(event, [], list(actions)))


F0 = "chains.0.filters.0"
A0 = "chains.0.actions.0"

# (body, status, code, field): every refusal a marketer can run into.
REFUSALS: list[Any] = [
    # offer level
    pytest.param(offer_with(), 422, "chains_required", "chains", id="no-chain"),
    pytest.param({"chains": [chain("birthday", [])]}, 422, "missing_field", "name", id="no-name"),
    pytest.param(
        offer_with(chain("birthday", []), colour="red"), 422, "unknown_field", "colour", id="extra-field"
    ),
    pytest.param(
        offer_with(chain("birthday", []), starts_at="2026-12-01T00:00:00+03:00"),
        422,
        "invalid_period",
        "starts_at",
        id="period-offset",
    ),
    pytest.param(
        offer_with(chain("birthday", []), starts_at="2026-12-02T00:00:00", ends_at="2026-12-01T00:00:00"),
        422,
        "invalid_period",
        "ends_at",
        id="period-reversed",
    ),
    pytest.param(
        offer_with(chain("birthday", []), budget_points="-1"),
        422,
        "invalid_amount",
        "budget_points",
        id="budget",
    ),
    pytest.param(
        offer_with(chain("birthday", []), max_uses_per_member=0),
        422,
        "greater_than_equal",
        "max_uses_per_member",
        id="max-uses",
    ),
    pytest.param(
        offer_with(chain("birthday", []), summable="yes"), 422, "bool_type", "summable", id="summable"
    ),
    # chains
    pytest.param(
        offer_with({"event": "sunrise", "actions": [{"type": "extra_bonus", "value": "1"}]}),
        422,
        "unknown_event",
        "chains.0.event",
        id="event",
    ),
    pytest.param(
        offer_with({"event": "birthday", "actions": []}),
        422,
        "actions_required",
        "chains.0.actions",
        id="no-action",
    ),
    pytest.param(on_cheque({"type": "weather"}), 422, "unknown_filter_type", f"{F0}.type", id="filter-type"),
    pytest.param(on_cheque({"codes": ["HYPER1"]}), 422, "missing_field", f"{F0}.type", id="filter-no-type"),
    pytest.param(
        with_action("birthday", {"type": "teleport"}),
        422,
        "unknown_action_type",
        f"{A0}.type",
        id="action-type",
    ),
    pytest.param(
        with_action(
            "discount_calculation", {"type": "discount", "value": "5"}, {"type": "bonus", "value": "5"}
        ),
        422,
        "action_not_allowed",
        "chains.0.actions.1.type",
        id="bonus-on-discount",
    ),
    pytest.param(
        with_action("write_off", {"type": "discount", "value": "5"}),
        422,
        "action_not_allowed",
        f"{A0}.type",
        id="discount-on-write-off",
    ),
    pytest.param(
        with_action("mobile_app_installed", {"type": "bonus", "value": "5"}),
        422,
        "action_not_allowed",
        f"{A0}.type",
        id="bonus-on-member-event",
    ),
    pytest.param(
        offer_with(chain("card_activated", [{"type": "products", "skus": ["MILK"]}])),
        422,
        "filter_not_allowed",
        f"{F0}.type",
        id="products-on-member-event",
    ),
    pytest.param(
        offer_with(chain("birthday", [{"type": "cheque_amount", "min": "10"}])),
        422,
        "filter_not_allowed",
        f"{F0}.type",
        id="amount-on-member-event",
    ),
    pytest.param(
        offer_with(chain("phone_linked", [{"type": "payment_method", "methods": ["cash"]}])),
        422,
        "filter_not_allowed",
        f"{F0}.type",
        id="payment-on-member-event",
    ),
    pytest.param(
        on_cheque({"type": "event_property", "property": "os", "values": ["ios"]}),
        422,
        "filter_not_allowed",
        f"{F0}.type",
        id="event-property-on-cheque",
    ),
    # stores
    pytest.param(on_cheque({"type": "stores"}), 422, "invalid_filter", F0, id="stores-empty"),
    pytest.param(
        on_cheque({"type": "stores", "codes": ["HYPER1"], "attribute": "x", "values": ["y"]}),
        422,
        "invalid_filter",
        F0,
        id="stores-both",
    ),
    pytest.param(
        on_cheque({"type": "stores", "attribute": "CustomTradeFormat"}),
        422,
        "missing_field",
        f"{F0}.values",
        id="stores-no-values",
    ),
    pytest.param(
        on_cheque({"type": "stores", "codes": []}), 422, "too_short", f"{F0}.codes", id="stores-no-codes"
    ),
    pytest.param(
        on_cheque({"type": "stores", "codes": ["HYPER1", "NOPE"]}),
        404,
        "unknown_store",
        f"{F0}.codes.1",
        id="stores-unknown",
    ),
    pytest.param(
        on_cheque({"type": "channel", "channels": ["fax"]}),
        422,
        "invalid_choice",
        f"{F0}.channels.0",
        id="channel",
    ),
    # payment methods
    pytest.param(
        on_cheque({"type": "payment_method", "methods": ["barter"]}),
        404,
        "unknown_payment_method",
        f"{F0}.methods.0",
        id="payment-unknown",
    ),
    pytest.param(
        on_cheque({"type": "payment_method", "methods": ["cash"], "min_share_percent": "101"}),
        422,
        "invalid_percent",
        f"{F0}.min_share_percent",
        id="payment-share",
    ),
    # products
    pytest.param(on_cheque({"type": "products"}), 422, "invalid_filter", F0, id="products-empty"),
    pytest.param(
        on_cheque({"type": "products", "skus": ["MILK", "BREAD"]}),
        404,
        "unknown_product",
        f"{F0}.skus.1",
        id="products-sku",
    ),
    pytest.param(
        on_cheque({"type": "products", "groups": ["sweets"]}),
        404,
        "unknown_product_group",
        f"{F0}.groups.0",
        id="products-group",
    ),
    pytest.param(
        on_cheque({"type": "products", "exclude_groups": ["sweets"]}),
        404,
        "unknown_product_group",
        f"{F0}.exclude_groups.0",
        id="products-exclude-group",
    ),
    pytest.param(
        on_cheque({"type": "products", "categories": ["Toys"]}),
        404,
        "unknown_category",
        f"{F0}.categories.0",
        id="products-category",
    ),
    pytest.param(
        on_cheque({"type": "products", "skus": ["MILK"], "min_quantity": "0"}),
        422,
        "invalid_quantity",
        f"{F0}.min_quantity",
        id="products-quantity",
    ),
    pytest.param(
        on_cheque({"type": "products", "min_quantity": "5", "max_quantity": "2"}),
        422,
        "invalid_range",
        f"{F0}.max_quantity",
        id="products-range",
    ),
    pytest.param(
        on_cheque({"type": "products", "min_amount": 9.99}),
        422,
        "invalid_value",
        f"{F0}.min_amount",
        id="products-float",
    ),
    pytest.param(
        on_cheque({"type": "products", "skus": ["MILK"], "quantity": "3"}),
        422,
        "unknown_field",
        f"{F0}.quantity",
        id="products-extra",
    ),
    # cheque amount, days, time, dates
    pytest.param(on_cheque({"type": "cheque_amount"}), 422, "invalid_filter", F0, id="amount-empty"),
    pytest.param(
        on_cheque({"type": "cheque_amount", "min": "100", "max": "50"}),
        422,
        "invalid_range",
        f"{F0}.max",
        id="amount-range",
    ),
    pytest.param(
        on_cheque({"type": "cheque_amount", "min": "10.001"}),
        422,
        "invalid_amount",
        f"{F0}.min",
        id="amount-places",
    ),
    pytest.param(
        on_cheque({"type": "days_of_week", "days": [1, 8]}), 422, "less_than_equal", f"{F0}.days.1", id="days"
    ),
    pytest.param(
        on_cheque({"type": "time_of_day", "from": "9:00", "to": "12:00"}),
        422,
        "invalid_time_of_day",
        f"{F0}.from",
        id="time-format",
    ),
    pytest.param(
        on_cheque({"type": "time_of_day", "from": "10:00", "to": "24:00"}),
        422,
        "invalid_time_of_day",
        f"{F0}.to",
        id="time-24",
    ),
    pytest.param(
        on_cheque({"type": "time_of_day", "from": "10:00", "to": "10:00"}),
        422,
        "invalid_range",
        f"{F0}.to",
        id="time-empty",
    ),
    pytest.param(
        on_cheque({"type": "dates", "from": "2026-12-31", "to": "2026-12-01"}),
        422,
        "invalid_range",
        f"{F0}.to",
        id="dates-range",
    ),
    pytest.param(
        on_cheque({"type": "dates", "from": "31.12.2026"}),
        422,
        "date_from_datetime_parsing",
        f"{F0}.from",
        id="dates-format",
    ),
    # members, cards, audiences
    pytest.param(
        on_cheque({"type": "card_state", "states": ["lost"]}),
        422,
        "invalid_choice",
        f"{F0}.states.0",
        id="card-state",
    ),
    pytest.param(
        on_cheque({"type": "cards", "numbers": ["12"]}),
        422,
        "invalid_card_number",
        f"{F0}.numbers.0",
        id="cards-format",
    ),
    pytest.param(
        on_cheque({"type": "cards", "numbers": ["9999888877776666"]}),
        404,
        "unknown_card",
        f"{F0}.numbers.0",
        id="cards-unknown",
    ),
    pytest.param(
        on_cheque({"type": "audience", "audiences": ["vip", "gold"]}),
        404,
        "unknown_audience",
        f"{F0}.audiences.1",
        id="audience-unknown",
    ),
    pytest.param(
        on_cheque({"type": "member_attribute", "attribute": "shoe_size", "value": "42"}),
        404,
        "unknown_attribute",
        f"{F0}.attribute",
        id="attribute-unknown",
    ),
    pytest.param(
        on_cheque({"type": "member_attribute", "attribute": "gender", "op": "like", "value": "f"}),
        422,
        "invalid_choice",
        f"{F0}.op",
        id="attribute-op",
    ),
    pytest.param(
        on_cheque({"type": "member_attribute", "attribute": "gender", "op": "in", "value": "female"}),
        422,
        "missing_field",
        f"{F0}.values",
        id="attribute-in-needs-values",
    ),
    pytest.param(
        on_cheque({"type": "member_attribute", "attribute": "city", "op": "exists", "value": "Kazan"}),
        422,
        "invalid_filter",
        f"{F0}.value",
        id="attribute-exists-no-value",
    ),
    pytest.param(
        on_cheque({"type": "member_attribute", "attribute": "gender", "value": "robot"}),
        422,
        "invalid_value",
        f"{F0}.value",
        id="attribute-enum",
    ),
    pytest.param(
        on_cheque({"type": "member_attribute", "attribute": "level", "op": "gte", "value": "high"}),
        422,
        "invalid_value",
        f"{F0}.value",
        id="attribute-integer",
    ),
    pytest.param(
        on_cheque(
            {
                "type": "member_attribute",
                "attribute": "birth_date",
                "op": "in",
                "values": ["1990-01-01", "soon"],
            }
        ),
        422,
        "invalid_value",
        f"{F0}.values.1",
        id="attribute-date",
    ),
    pytest.param(
        on_cheque({"type": "member_attribute", "attribute": "level", "value": 2.5}),
        422,
        "invalid_value",
        f"{F0}.value",
        id="attribute-float",
    ),
    pytest.param(on_cheque({"type": "birthday"}), 422, "invalid_filter", F0, id="birthday-empty"),
    pytest.param(
        on_cheque({"type": "birthday", "within_days": 400}),
        422,
        "less_than_equal",
        f"{F0}.within_days",
        id="birthday-days",
    ),
    pytest.param(
        offer_with(
            chain("mobile_app_installed", [{"type": "event_property", "property": "os", "values": []}])
        ),
        422,
        "too_short",
        f"{F0}.values",
        id="event-property",
    ),
    # actions
    pytest.param(
        with_action("discount_calculation", {"type": "discount", "value": "0"}),
        422,
        "invalid_value",
        f"{A0}.value",
        id="discount-zero",
    ),
    pytest.param(
        with_action("discount_calculation", {"type": "discount", "value": "150"}),
        422,
        "invalid_percent",
        f"{A0}.value",
        id="discount-percent",
    ),
    pytest.param(
        with_action("discount_calculation", {"type": "discount", "kind": "amount", "value": "1.005"}),
        422,
        "invalid_amount",
        f"{A0}.value",
        id="discount-places",
    ),
    pytest.param(
        with_action("discount_calculation", {"type": "discount", "kind": "gift", "value": "1"}),
        422,
        "invalid_choice",
        f"{A0}.kind",
        id="discount-kind",
    ),
    pytest.param(
        with_action("discount_calculation", {"type": "discount"}),
        422,
        "missing_field",
        f"{A0}.value",
        id="discount-no-value",
    ),
    pytest.param(
        with_action("discount_calculation", {"type": "discount", "value": 10}),
        201,
        None,
        None,
        id="discount-int-ok",
    ),
    pytest.param(
        with_action("bonus_calculation", {"type": "bonus", "value": "101"}),
        422,
        "invalid_percent",
        f"{A0}.value",
        id="bonus-percent",
    ),
    pytest.param(
        with_action("bonus_calculation", {"type": "bonus", "value": "5", "currency": "gold"}),
        404,
        "unknown_currency",
        f"{A0}.currency",
        id="bonus-currency",
    ),
    pytest.param(
        with_action("bonus_calculation", {"type": "bonus", "value": "5", "lifetime_days": 0}),
        422,
        "greater_than_equal",
        f"{A0}.lifetime_days",
        id="bonus-lifetime",
    ),
    pytest.param(
        with_action("bonus_calculation", {"type": "bonus", "value": "5", "activation_delay_days": -1}),
        422,
        "greater_than_equal",
        f"{A0}.activation_delay_days",
        id="bonus-delay",
    ),
    pytest.param(
        with_action("birthday", {"type": "extra_bonus", "value": "-5"}),
        422,
        "invalid_value",
        f"{A0}.value",
        id="extra-negative",
    ),
    pytest.param(
        with_action("birthday", {"type": "extra_bonus", "value": "5", "legal_entity": "LE9"}),
        404,
        "unknown_legal_entity",
        f"{A0}.legal_entity",
        id="extra-legal-entity",
    ),
    pytest.param(
        with_action("birthday", {"type": "extra_bonus", "value": "5", "currency": "gold"}),
        404,
        "unknown_currency",
        f"{A0}.currency",
        id="extra-currency",
    ),
    pytest.param(
        with_action("write_off", {"type": "write_off_rule", "max_percent": "120"}),
        422,
        "invalid_percent",
        f"{A0}.max_percent",
        id="write-off-percent",
    ),
    pytest.param(
        with_action("write_off", {"type": "write_off_rule", "exclude_groups": ["alcohol"]}),
        404,
        "unknown_product_group",
        f"{A0}.exclude_groups.0",
        id="write-off-group",
    ),
    pytest.param(
        with_action("write_off", {"type": "write_off_rule", "currency": "gold"}),
        404,
        "unknown_currency",
        f"{A0}.currency",
        id="write-off-currency",
    ),
    pytest.param(
        with_action("discount_calculation", {"type": "set_min_price"}),
        422,
        "invalid_action",
        A0,
        id="min-price-none",
    ),
    pytest.param(
        with_action(
            "discount_calculation", {"type": "set_min_price", "price": "10", "percent_of_price": "50"}
        ),
        422,
        "invalid_action",
        A0,
        id="min-price-both",
    ),
    pytest.param(
        with_action("discount_calculation", {"type": "set_min_price", "price": "-1"}),
        422,
        "invalid_amount",
        f"{A0}.price",
        id="min-price-negative",
    ),
    pytest.param(
        with_action("birthday", {"type": "cheque_message", "text": ""}),
        422,
        "string_too_short",
        f"{A0}.text",
        id="message-empty",
    ),
    pytest.param(
        with_action("birthday", {"type": "cashier_message", "text": "Hello {first_name"}),
        422,
        "invalid_template",
        f"{A0}.text",
        id="message-braces",
    ),
    pytest.param(
        with_action("birthday", {"type": "cheque_message", "text": "You saved {0}"}),
        422,
        "invalid_template",
        f"{A0}.text",
        id="message-positional",
    ),
]


def test_every_bad_filter_and_action_is_refused_with_its_code_and_path(api: Api, db: Database) -> None:
    """One client for the whole table (each case is a request): what matters is each answer."""
    seed(db, api)
    failures = []
    for case in REFUSALS:
        body, status, code, field = case.values
        response = api.post(OFFERS, json=body)
        got = (response.status_code, response.json().get("error", {}).get("code"))
        got_field = response.json().get("error", {}).get("field")
        if got != (status, code) or (field is not None and got_field != field):
            failures.append(f"{case.id}: expected {status} {code} at {field}, got {got} at {got_field}")
    assert not failures, "\n".join(failures)
    # Refusals change nothing: only the one valid case created an offer.
    assert len(api.get(OFFERS).json()["items"]) == 1


def test_every_filter_and_action_type_has_a_valid_form(api: Api, db: Database) -> None:
    seed(db, api)
    cheque_filters = [
        {"type": "stores", "codes": ["HYPER1"], "exclude": True},
        {"type": "channel", "channels": ["offline", "mobile_app"]},
        {"type": "payment_method", "methods": ["online"], "min_share_percent": "50"},
        {
            "type": "products",
            "skus": ["MILK"],
            "groups": ["dairy"],
            "categories": ["Dairy"],
            "brands": ["Farm"],
            "exclude_skus": ["MILK"],
            "exclude_groups": ["dairy"],
            "min_quantity": "2",
            "max_quantity": "10",
            "min_amount": "100",
        },
        {"type": "cheque_amount", "min": "500"},
        {"type": "days_of_week", "days": [7, 6, 6]},
        {"type": "time_of_day", "from": "22:00", "to": "06:00"},
        {"type": "dates", "from": "2026-12-01", "to": "2026-12-31"},
        {"type": "members_only"},
        {"type": "card_state", "states": ["activated"]},
        {"type": "cards", "numbers": ["1000 2000 3000 4000"]},
        {"type": "audience", "audiences": ["vip"], "exclude": True},
        {"type": "member_attribute", "attribute": "level", "op": "gte", "value": 3},
        {"type": "member_attribute", "attribute": "gender", "op": "in", "values": ["female"]},
        {"type": "member_attribute", "attribute": "city", "op": "exists"},
        {"type": "birthday", "within_days": 7},
    ]
    body = offer_with(
        chain(
            "discount_calculation",
            cheque_filters,
            [
                {"type": "discount", "kind": "price_per_unit", "value": "99.90"},
                {"type": "set_min_price", "percent_of_price": "80"},
                {"type": "cashier_message", "text": "Offer for {card}"},
            ],
        ),
        chain(
            "write_off",
            [],
            [
                {
                    "type": "write_off_rule",
                    "currency": "stars",
                    "max_percent": "30",
                    "exclude_groups": ["dairy"],
                }
            ],
        ),
        chain(
            "bonus_calculation",
            [],
            [
                {
                    "type": "bonus",
                    "kind": "percent",
                    "value": "2.5",
                    "currency": "stars",
                    "activation_delay_days": 14,
                    "lifetime_days": 365,
                },
                {"type": "extra_bonus", "value": "50", "legal_entity": "LE1"},
            ],
        ),
        chain(
            "mobile_app_installed",
            [{"type": "event_property", "property": "platform", "values": ["ios", True]}],
        ),
        starts_at="2026-12-01T00:00:00",
        ends_at="2027-01-01T00:00:00",
        max_uses_per_member=1,
        budget_points="100000",
        budget_money="5000.50",
    )
    offer = create(api, body)
    filters = offer["chains"][0]["filters"]
    assert filters[5]["days"] == [6, 7]
    assert filters[6] == {"type": "time_of_day", "from": "22:00", "to": "06:00"}
    assert filters[10]["numbers"] == ["1000200030004000"]
    assert offer["chains"][3]["filters"][0]["values"] == ["ios", "true"]
    assert (offer["starts_at"], offer["budget_money"]) == ("2026-12-01T00:00:00", "5000.50")
    # What is stored compiles: the engine reads every parameter without a KeyError.
    assert set_status(api, offer["id"], "active").status_code == 200
    with db.reading() as session:
        snapshot = active_snapshot(session)
    assert len(snapshot.by_event) == 4


def test_status_life_cycle_with_history(api: Api, db: Database) -> None:
    seed(db, api)
    offer = create(api, HYPERMARKET_10)
    oid = offer["id"]
    refused = set_status(api, oid, "paused")
    assert_error(refused, 409, "invalid_status_transition", "status")
    for status in ("active", "paused", "active", "paused", "finished"):
        response = set_status(api, oid, status)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == status
    assert set_status(api, oid, "finished").status_code == 200  # the same status again: no change
    for status in ("active", "paused", "draft"):
        assert_error(set_status(api, oid, status), 409, "invalid_status_transition")
    assert_error(api.patch(f"{OFFERS}/{oid}", json={"priority": 1}), 409, "offer_not_editable")
    assert set_status(api, oid, "archived").status_code == 200
    assert_error(set_status(api, oid, "draft"), 409, "invalid_status_transition")
    assert_error(set_status(api, oid, "deleted"), 422, "invalid_choice", "status")

    history = api.get(f"{OFFERS}/{oid}/history").json()["items"]
    assert [(h["from_status"], h["to_status"]) for h in history] == [
        (None, "draft"),
        ("draft", "active"),
        ("active", "paused"),
        ("paused", "active"),
        ("active", "paused"),
        ("paused", "finished"),
        ("finished", "archived"),
    ]
    assert all(h["actor"] == "admin:test admin" for h in history)
    page = api.get(f"{OFFERS}/{oid}/history", params={"limit": 4}).json()
    assert len(page["items"]) == 4 and page["next_cursor"]
    audit = api.get("/api/v1/admin/audit", params={"entity": "offer", "entity_id": str(oid)}).json()["items"]
    assert [a["action"] for a in audit].count("status") == 6
    assert audit[-1]["action"] == "create"
    # A draft may be archived without ever running.
    draft = create(api, HYPERMARKET_10)
    assert set_status(api, draft["id"], "archived").json()["status"] == "archived"
    assert_error(api.get(f"{OFFERS}/999999/history"), 404, "unknown_offer")


def test_patch_changes_fields_replaces_chains_and_is_audited(api: Api, db: Database) -> None:
    seed(db, api)
    offer = create(api, {**HYPERMARKET_10, "ends_at": "2027-01-01T00:00:00", "description": "Winter"})
    oid = offer["id"]
    new_chains = [chain("bonus_calculation", [{"type": "members_only"}], [{"type": "bonus", "value": "7"}])]
    response = api.patch(
        f"{OFFERS}/{oid}", json={"name": "Winter points", "description": None, "chains": new_chains}
    )
    assert response.status_code == 200, response.text
    patched = response.json()
    assert (patched["name"], patched["description"], patched["priority"]) == ("Winter points", None, 10)
    assert [c["event"] for c in patched["chains"]] == ["bonus_calculation"]
    assert patched["ends_at"] == "2027-01-01T00:00:00"

    # Refusals name the field and change nothing.
    assert_error(
        api.patch(f"{OFFERS}/{oid}", json={"starts_at": "2027-02-01T00:00:00"}),
        422,
        "invalid_period",
        "starts_at",
    )
    assert_error(
        api.patch(f"{OFFERS}/{oid}", json={"ends_at": "2026-01-01T00:00:00Z"}),
        422,
        "invalid_period",
        "ends_at",
    )
    assert_error(api.patch(f"{OFFERS}/{oid}", json={"name": None}), 422, "null_not_allowed", "name")
    assert_error(api.patch(f"{OFFERS}/{oid}", json={"chains": []}), 422, "chains_required", "chains")
    bad = [chain("bonus_calculation", []), chain("write_off", [], [{"type": "bonus", "value": "1"}])]
    assert_error(
        api.patch(f"{OFFERS}/{oid}", json={"chains": bad}),
        422,
        "action_not_allowed",
        "chains.1.actions.0.type",
    )
    unknown = [chain("bonus_calculation", [{"type": "audience", "audiences": ["nobody"]}])]
    assert_error(
        api.patch(f"{OFFERS}/{oid}", json={"chains": unknown}),
        404,
        "unknown_audience",
        "chains.0.filters.0.audiences.0",
    )
    assert_error(api.patch(f"{OFFERS}/424242", json={"name": "x"}), 404, "unknown_offer")
    assert api.get(f"{OFFERS}/{oid}").json() == patched

    audit = api.get("/api/v1/admin/audit", params={"entity": "offer", "entity_id": str(oid)}).json()["items"]
    assert audit[0]["action"] == "update"
    assert set(audit[0]["before"]) == {"name", "description", "chains"}
    assert (
        audit[0]["before"]["name"] == "10% in hypermarkets" and audit[0]["after"]["name"] == "Winter points"
    )
    # Clearing the period end works; an empty patch changes nothing.
    assert api.patch(f"{OFFERS}/{oid}", json={"ends_at": None}).json()["ends_at"] is None
    assert api.patch(f"{OFFERS}/{oid}", json={}).status_code == 200


def test_active_snapshot_sees_activation_patch_and_pause_at_once(api: Api, db: Database) -> None:
    seed(db, api)
    offer = create(api, HYPERMARKET_10)

    def snapshot_offers() -> dict[int, engine.Offer]:
        with db.reading() as session:
            return {o.id: o for o in active_snapshot(session).offers}

    assert snapshot_offers() == {}
    set_status(api, offer["id"], "active")
    assert snapshot_offers()[offer["id"]].priority == 10
    api.patch(
        f"{OFFERS}/{offer['id']}",
        json={
            "priority": 30,
            "chains": [chain("discount_calculation", [], [{"type": "discount", "value": "15"}])],
        },
    )
    seen = snapshot_offers()[offer["id"]]
    assert seen.priority == 30
    assert seen.chains[0].actions[0].params["value"] == "15" and seen.chains[0].filters == ()
    set_status(api, offer["id"], "paused")
    assert snapshot_offers() == {}


def test_counters_show_spent_budgets_and_uses(api: Api, db: Database) -> None:
    seed(db, api)
    offer = create(api, {**ONLINE_PAYMENT_100, "budget_points": "1000"})
    with db.transaction() as session:
        members = [Member(first_name=f"M{i}") for i in range(2)]
        session.add_all(members)
        session.flush()
        for member in (members[0], members[0], members[1]):
            record_use(
                session,
                offer_ids=[offer["id"]],
                member_id=member.id,
                points={offer["id"]: D("100")},
                money={},
            )
    shown = api.get(f"{OFFERS}/{offer['id']}").json()
    assert (shown["spent_points"], shown["spent_money"], shown["uses"], shown["budget_points"]) == (
        "300.00",
        "0.00",
        3,
        "1000.00",
    )
    assert api.get(OFFERS).json()["items"][0]["uses"] == 3


def test_list_filters_by_status_and_name_and_pages(api: Api, db: Database) -> None:
    seed(db, api)
    ids = [
        create(api, {**HYPERMARKET_10, "name": name})["id"]
        for name in ("Winter sale", "Summer sale", "Points 50%_off", "Скидка зимой")
    ]
    set_status(api, ids[1], "active")
    assert [o["id"] for o in api.get(OFFERS, params={"status": "active"}).json()["items"]] == [ids[1]]
    assert [o["id"] for o in api.get(OFFERS, params={"q": "SALE"}).json()["items"]] == ids[:2]
    assert [o["id"] for o in api.get(OFFERS, params={"q": "%_"}).json()["items"]] == [ids[2]]
    assert [o["id"] for o in api.get(OFFERS, params={"q": "скидка"}).json()["items"]] == [ids[3]]
    assert_error(api.get(OFFERS, params={"status": "live"}), 422, "invalid_choice", "status")
    first = api.get(OFFERS, params={"limit": 3}).json()
    rest = api.get(OFFERS, params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [o["id"] for o in first["items"] + rest["items"]] == ids and rest["next_cursor"] is None


def test_roles_marketer_writes_analyst_and_operator_read(api: Api, db: Database) -> None:
    seed(db, api)
    offer = create(api, HYPERMARKET_10)
    for role in ("analyst", "operator"):
        reader = api.as_key(make_key(db, role))
        assert_error(reader.post(OFFERS, json=HYPERMARKET_10), 403, "forbidden")
        assert_error(reader.patch(f"{OFFERS}/{offer['id']}", json={"priority": 1}), 403, "forbidden")
        assert_error(set_status(reader, offer["id"], "active"), 403, "forbidden")
        assert reader.get(f"{OFFERS}/{offer['id']}").status_code == 200
        assert reader.get(f"{OFFERS}/{offer['id']}/history").status_code == 200
    with db.reading() as session:
        member_id = session.scalar(select(Member.id))
    for role in ("pos", "client"):
        scope = {"store": "HYPER1"} if role == "pos" else {"member_id": member_id}
        assert_error(api.as_key(make_key(db, role, **scope)).get(OFFERS), 403, "forbidden")
    marketer = api.as_key(make_key(db, "marketer"))
    created = marketer.post(OFFERS, json=HYPERMARKET_10)
    assert created.status_code == 201
    assert set_status(marketer, created.json()["id"], "active").status_code == 200


def test_activation_checks_references_again(api: Api, db: Database) -> None:
    seed(db, api)
    api.post("/api/v1/admin/audiences", json={"code": "temp", "name": "Temporary"})
    offer = create(api, on_cheque({"type": "audience", "audiences": ["temp"]}))
    assert api.delete("/api/v1/admin/audiences/temp").status_code == 204  # a draft does not hold it
    refused = set_status(api, offer["id"], "active")
    assert_error(refused, 404, "unknown_audience", "chains.0.filters.0.audiences.0")
    assert api.get(f"{OFFERS}/{offer['id']}").json()["status"] == "draft"


def test_offers_active_at_a_moment_come_from_the_history(api: Api, db: Database) -> None:
    seed(db, api)
    a, b, c = (create(api, HYPERMARKET_10)["id"] for _ in range(3))
    t0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    # a: active from t0+1h, paused at t0+3h, active again at t0+5h; b: active t0+2h, finished t0+4h; c: draft
    changes = [
        (a, "draft", "active", 1),
        (b, "draft", "active", 2),
        (a, "active", "paused", 3),
        (b, "active", "finished", 4),
        (a, "paused", "active", 5),
    ]
    with db.transaction() as session:
        session.execute(update(OfferStatusChange).values(at=t0))
        for offer_id, before, after, hours in changes:
            session.add(
                OfferStatusChange(
                    offer_id=offer_id,
                    from_status=before,
                    to_status=after,
                    at=t0 + timedelta(hours=hours),
                    actor="test",
                )
            )
    with db.reading() as session:

        def at(hours: float) -> set[int]:
            return offer_ids_active_at(session, t0 + timedelta(hours=hours))

        assert at(0.5) == set()
        assert at(1) == {a}
        assert at(2.5) == {a, b}
        assert at(3.5) == {b}
        assert at(4.5) == set()
        assert at(6) == {a}
        # Aware moments in any zone; naive ones are refused.
        assert offer_ids_active_at(session, datetime(2026, 11, 1, 12, 30, tzinfo=UTC).astimezone()) == {b}
        with pytest.raises(AppError):
            offer_ids_active_at(session, datetime(2026, 11, 1, 12, 0))
        assert c not in at(100)
        statuses = dict(session.execute(select(Offer.id, Offer.status)).all())
    assert statuses[c] == "draft"


def test_json_amounts_and_errors_keep_their_shape(api: Api, db: Database) -> None:
    seed(db, api)
    body = copy.deepcopy(HYPERMARKET_10)
    body["chains"][0]["actions"][0]["value"] = "12.5"
    offer = create(api, body)
    assert offer["chains"][0]["actions"][0]["value"] == "12.5"
    assert isinstance(offer["created_at"], str) and offer["created_at"].endswith(("+00:00", "Z"))
    error = assert_error(api.post(OFFERS, json=on_cheque({"type": "weather"})), 422, "unknown_filter_type")
    assert "stores" in error["error"]["message"]
