"""The POS API end to end: calculate → confirm/cancel, refund, offline cheques, balance, rules."""

from __future__ import annotations

import threading
from datetime import datetime
from decimal import Decimal as D
from typing import Any

import pytest

from omniloyal.db.engine import Database
from omniloyal.offers.models import Offer
from tests.conftest import Api, assert_error, make_key

ADMIN = "/api/v1/admin"
POS = "/api/v1/pos"
NOON = "2026-11-23T12:00:00+03:00"


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def add_offer(db: Database, name: str, chains: list[dict[str, Any]], **fields: Any) -> int:
    with db.transaction() as session:
        offer = Offer(name=name, status="active", chains=chains, **fields)
        session.add(offer)
        session.flush()
        return offer.id


@pytest.fixture
def shop(api: Api, db: Database) -> dict[str, Any]:
    """A legal entity, a hypermarket, a minimarket, the online store, products, a member with points."""
    ok(api.post(f"{ADMIN}/legal-entities", json={"code": "LE", "name": "Retail LLC"}), 201)
    for code, fmt, channel in (
        ("HYPER", "Hypermarket", "offline"),
        ("MINI", "Minimarket", "offline"),
        ("WEB", None, "online_store"),
    ):
        attrs = {"CustomTradeFormat": fmt} if fmt else {}
        ok(
            api.post(
                f"{ADMIN}/stores",
                json={
                    "code": code,
                    "name": code,
                    "legal_entity": "LE",
                    "channel": channel,
                    "timezone": "Europe/Moscow",
                    "attributes": attrs,
                },
            ),
            201,
        )
    for method in ("cash", "card", "online"):
        ok(api.post(f"{ADMIN}/payment-methods", json={"code": method, "name": method}), 201)
    ok(
        api.post(
            f"{ADMIN}/products",
            json={"sku": "MILK", "name": "Milk", "price": "100.00", "category": "Food / Dairy / Milk"},
        ),
        201,
    )
    ok(
        api.post(
            f"{ADMIN}/products",
            json={"sku": "WINE", "name": "Wine", "price": "500.00", "category": "Drinks / Alcohol"},
        ),
        201,
    )
    ok(
        api.post(
            f"{ADMIN}/product-groups",
            json={"code": "alcohol", "name": "Alcohol", "rule": {"categories": ["Drinks / Alcohol"]}},
        ),
        201,
    )
    member = ok(
        api.post(
            f"{ADMIN}/members",
            json={
                "first_name": "Anna",
                "phone": "+79123456789",
                "cards": [{"number": "1000", "kind": "physical", "state": "activated"}],
            },
        ),
        201,
    )
    ok(
        api.post(
            f"{ADMIN}/members/{member['id']}/ledger",
            json={"kind": "accrual", "amount": "100", "reason": "welcome"},
        ),
        201,
    )
    hyper = api.as_key(make_key(db, "pos", store="HYPER"))
    return {"member": member["id"], "hyper": hyper}


def purchase(
    operation: str,
    *,
    card: str | None = "1000",
    lines: list[tuple[str, str, str]] | None = None,
    write_off: str | None = None,
    payments: list[tuple[str, str]] | None = None,
    explain: bool = False,
    created_at: str = NOON,
) -> dict[str, Any]:
    items = lines or [("MILK", "100.00", "2")]
    cheque_lines = [
        {"line": n, "sku": sku, "price": price, "quantity": qty, "amount": str(D(price) * D(qty))}
        for n, (sku, price, qty) in enumerate(items, start=1)
    ]
    total = sum(D(x["amount"]) for x in cheque_lines)
    body: dict[str, Any] = {
        "operation_id": operation,
        "cheque": {
            "number": f"C-{operation}",
            "created_at": created_at,
            "lines": cheque_lines,
            "payments": [{"method": m, "amount": a} for m, a in (payments or [("card", str(total))])],
        },
        "explain": explain,
    }
    if card:
        body["identifier"] = {"card": card}
    if write_off:
        body["write_off"] = {"currency": "bonus", "amount": write_off}
    return body


def balance_of(api: Api, member_id: int) -> dict[str, D]:
    items = ok(api.get(f"{ADMIN}/members/{member_id}/balance"))["balances"]
    bonus = next((b for b in items if b["currency"] == "bonus"), None)
    return {k: D(bonus[k]) for k in ("available", "pending", "reserved")} if bonus else {}


EARN_5 = [
    {
        "event": "bonus_calculation",
        "filters": [],
        "actions": [{"type": "bonus", "kind": "percent", "value": "5"}],
    }
]
PAY_50 = [
    {
        "event": "write_off",
        "filters": [],
        "actions": [
            {
                "type": "write_off_rule",
                "currency": "bonus",
                "max_percent": "50",
                "exclude_groups": ["alcohol"],
            }
        ],
    }
]
HYPER_10 = [
    {
        "event": "discount_calculation",
        "filters": [{"type": "stores", "attribute": "CustomTradeFormat", "values": ["Hypermarket"]}],
        "actions": [{"type": "discount", "kind": "percent", "value": "10"}],
    }
]


def test_discount_only_in_hypermarkets_and_anonymous_buyers_earn_nothing(
    api: Api, db: Database, shop: dict[str, Any]
) -> None:
    add_offer(db, "10% in hypermarkets", HYPER_10)
    add_offer(db, "5% back", EARN_5, summable=True)
    answer = ok(shop["hyper"].post(f"{POS}/calculate", json=purchase("a1", card=None)))
    assert answer["totals"]["discount"] == "20.00" and answer["totals"]["to_pay"] == "180.00"
    assert answer["totals"]["bonus"] == {} and "member" not in answer
    mini = api.as_key(make_key(db, "pos", store="MINI"))
    answer = ok(mini.post(f"{POS}/calculate", json=purchase("a1", card=None)))
    assert answer["totals"]["discount"] == "0.00"


def test_points_change_only_on_confirm(api: Api, db: Database, shop: dict[str, Any]) -> None:
    add_offer(db, "5% back", EARN_5)
    till = shop["hyper"]
    answer = ok(till.post(f"{POS}/calculate", json=purchase("p1")))
    assert answer["totals"]["bonus"] == {"bonus": "10.00"}
    assert answer["balance"][0]["available"] == "100.00"
    assert balance_of(api, shop["member"])["available"] == D(100)
    confirmed = ok(till.post(f"{POS}/confirm", json={"operation_id": "p1"}))
    assert confirmed["accrued"] == {"bonus": "10.00"}
    assert balance_of(api, shop["member"])["available"] == D(110)
    # A repeated confirm answers the same and books nothing twice.
    assert ok(till.post(f"{POS}/confirm", json={"operation_id": "p1"})) == confirmed
    assert balance_of(api, shop["member"])["available"] == D(110)
    history = ok(api.get(f"{ADMIN}/members/{shop['member']}/history"))["items"]
    assert history[0]["source"] == "purchase" and history[0]["amount"] in ("10.00", "10.0000", "10")


def test_write_off_is_reserved_then_confirmed_or_released(
    api: Api, db: Database, shop: dict[str, Any]
) -> None:
    add_offer(db, "pay half", PAY_50)
    till = shop["hyper"]
    answer = ok(till.post(f"{POS}/calculate", json=purchase("w1", write_off="60")))
    assert answer["max_write_off"] == {"bonus": "100.00"}
    assert answer["totals"]["write_off"] == {"bonus": "60"} or answer["totals"]["write_off"] == {
        "bonus": "60.00"
    }
    assert answer["totals"]["to_pay"] == "140.00"
    assert balance_of(api, shop["member"]) == {"available": D(40), "pending": D(0), "reserved": D(60)}
    ok(till.post(f"{POS}/cancel", json={"operation_id": "w1"}))
    assert balance_of(api, shop["member"])["available"] == D(100)
    assert_error(till.post(f"{POS}/confirm", json={"operation_id": "w1"}), 409, "operation_cancelled")
    ok(till.post(f"{POS}/calculate", json=purchase("w2", write_off="60")))
    confirmed = ok(till.post(f"{POS}/confirm", json={"operation_id": "w2"}))
    assert D(confirmed["written_off"]["bonus"]) == D(60)
    assert balance_of(api, shop["member"]) == {"available": D(40), "pending": D(0), "reserved": D(0)}
    assert_error(till.post(f"{POS}/cancel", json={"operation_id": "w2"}), 409, "operation_confirmed")


def test_write_off_limits(api: Api, db: Database, shop: dict[str, Any]) -> None:
    add_offer(db, "pay half", PAY_50)
    till = shop["hyper"]
    # Alcohol is excluded: only half of the milk (50 of 100) may be paid with points.
    body = purchase("l1", lines=[("MILK", "100.00", "1"), ("WINE", "500.00", "1")], write_off="60")
    error = assert_error(
        till.post(f"{POS}/calculate", json=body), 409, "write_off_limit_exceeded", "write_off.amount"
    )
    assert error["error"]["details"]["max_write_off"] == "50.00"
    body = purchase("l2", lines=[("WINE", "500.00", "1"), ("MILK", "100.00", "10")], write_off="150")
    assert_error(till.post(f"{POS}/calculate", json=body), 409, "insufficient_points")
    assert balance_of(api, shop["member"])["reserved"] == D(0)


def test_same_operation_id_returns_the_first_answer(api: Api, db: Database, shop: dict[str, Any]) -> None:
    add_offer(db, "pay half", PAY_50)
    till = shop["hyper"]
    first = ok(till.post(f"{POS}/calculate", json=purchase("i1", write_off="30")))
    again = ok(till.post(f"{POS}/calculate", json=purchase("i1", write_off="30")))
    assert again == first
    assert balance_of(api, shop["member"])["reserved"] == D(30)
    assert_error(
        till.post(f"{POS}/calculate", json=purchase("i1", write_off="31")), 409, "operation_conflict"
    )


def test_card_rules(api: Api, db: Database, shop: dict[str, Any]) -> None:
    add_offer(db, "5% back", EARN_5)
    add_offer(db, "pay half", PAY_50)
    till = shop["hyper"]
    ok(api.post(f"{ADMIN}/cards", json={"numbers": ["2000"], "kind": "physical"}), 201)
    # A card handed out but never registered earns points, but cannot pay with them.
    earned = ok(till.post(f"{POS}/calculate", json=purchase("c1", card="2000")))
    assert earned["totals"]["bonus"] == {"bonus": "10.00"} and earned["member"]["can_spend"] is False
    assert_error(
        till.post(f"{POS}/calculate", json=purchase("c2", card="2000", write_off="1")),
        409,
        "card_not_activated",
    )
    ok(api.post(f"{ADMIN}/cards/1000/block", json={"reason": "lost"}))
    assert_error(till.post(f"{POS}/calculate", json=purchase("c3")), 409, "card_blocked")
    assert_error(till.post(f"{POS}/calculate", json=purchase("c4", card="9999")), 404, "unknown_card")
    # Identified by phone instead, the member is found again.
    body = purchase("c5", card=None)
    body["identifier"] = {"phone": "8 912 345-67-89"}
    assert ok(till.post(f"{POS}/calculate", json=body))["member"]["id"] == shop["member"]


def test_refund_takes_back_earned_and_returns_paid_points(
    api: Api, db: Database, shop: dict[str, Any]
) -> None:
    add_offer(db, "5% back", EARN_5)
    add_offer(db, "pay half", PAY_50)
    till = shop["hyper"]
    ok(till.post(f"{POS}/calculate", json=purchase("r1", lines=[("MILK", "100.00", "4")], write_off="100")))
    ok(till.post(f"{POS}/confirm", json={"operation_id": "r1"}))
    # 400 - 100 points = 300 paid → 15 points earned; balance 0 + 15
    assert balance_of(api, shop["member"])["available"] == D(15)
    refund = ok(
        till.post(
            f"{POS}/refund",
            json={
                "operation_id": "r1-back",
                "purchase_operation_id": "r1",
                "lines": [{"line": 1, "quantity": "2"}],
            },
        )
    )
    assert D(refund["points_taken_back"]["bonus"]) == D("7.50")
    assert D(refund["points_returned"]["bonus"]) == D(50)
    assert balance_of(api, shop["member"])["available"] == D("57.50")
    # Repeating the refund changes nothing; returning more than was bought is refused.
    assert (
        ok(
            till.post(
                f"{POS}/refund",
                json={
                    "operation_id": "r1-back",
                    "purchase_operation_id": "r1",
                    "lines": [{"line": 1, "quantity": "2"}],
                },
            )
        )
        == refund
    )
    assert_error(
        till.post(
            f"{POS}/refund",
            json={
                "operation_id": "r1-more",
                "purchase_operation_id": "r1",
                "lines": [{"line": 1, "quantity": "3"}],
            },
        ),
        409,
        "refund_exceeds_purchase",
    )
    assert balance_of(api, shop["member"])["available"] == D("57.50")


def test_refund_after_the_points_were_spent_leaves_a_debt(
    api: Api, db: Database, shop: dict[str, Any]
) -> None:
    add_offer(db, "5% back", EARN_5)
    till = shop["hyper"]
    ok(till.post(f"{POS}/calculate", json=purchase("d1", lines=[("MILK", "100.00", "20")])))
    ok(till.post(f"{POS}/confirm", json={"operation_id": "d1"}))  # +100 → 200
    ok(
        api.post(
            f"{ADMIN}/members/{shop['member']}/ledger",
            json={"kind": "write_off", "amount": "200", "reason": "spent in a partner shop"},
        ),
        201,
    )
    ok(till.post(f"{POS}/refund", json={"operation_id": "d1-back", "purchase_operation_id": "d1"}))
    balance = balance_of(api, shop["member"])
    assert balance["available"] == D(-100)


def test_offline_cheques_accrue_only_and_report_each_cheque(
    api: Api, db: Database, shop: dict[str, Any]
) -> None:
    add_offer(db, "5% back", EARN_5)
    add_offer(db, "10% in hypermarkets", HYPER_10)
    till = shop["hyper"]
    good = purchase("off1")
    stranger = purchase("off2", card="7777")
    result = ok(
        till.post(
            f"{POS}/offline-cheques",
            json={
                "cheques": [
                    {k: good[k] for k in ("operation_id", "identifier", "cheque")},
                    {k: stranger[k] for k in ("operation_id", "identifier", "cheque")},
                ]
            },
        )
    )
    assert (result["accepted"], result["rejected"]) == (1, 1)
    assert result["results"][0]["accrued"] == {"bonus": "10.00"}  # no discount offline: 5% of 200
    assert result["results"][1]["error"]["code"] == "unknown_card"
    again = ok(
        till.post(
            f"{POS}/offline-cheques",
            json={"cheques": [{k: good[k] for k in ("operation_id", "identifier", "cheque")}]},
        )
    )
    assert again["duplicates"] == 1
    assert balance_of(api, shop["member"])["available"] == D(110)


def test_online_payment_bonus_and_explain(api: Api, db: Database, shop: dict[str, Any]) -> None:
    add_offer(
        db,
        "100 for paying online",
        [
            {
                "event": "bonus_calculation",
                "filters": [{"type": "payment_method", "methods": ["online"]}],
                "actions": [{"type": "extra_bonus", "value": "100", "currency": "bonus"}],
            }
        ],
        summable=True,
    )
    web = api.as_key(make_key(db, "pos", store="WEB"))
    online = ok(web.post(f"{POS}/calculate", json=purchase("o1", payments=[("online", "200.00")])))
    assert online["totals"]["bonus"] == {"bonus": "100.00"}
    cash = ok(shop["hyper"].post(f"{POS}/calculate", json=purchase("o2", explain=True)))
    assert cash["totals"]["bonus"] == {}
    assert any("not paid by" in e["reason"] for e in cash["explain"])


def test_store_scope_of_keys(api: Api, db: Database, shop: dict[str, Any]) -> None:
    assert_error(
        shop["hyper"].post(f"{POS}/calculate", json={**purchase("s1"), "store": "MINI"}),
        403,
        "store_mismatch",
    )
    assert_error(api.post(f"{POS}/calculate", json=purchase("s2")), 400, "store_required")
    assert ok(api.post(f"{POS}/calculate", json={**purchase("s3"), "store": "MINI"}))["store"] == "MINI"
    analyst = api.as_key(make_key(db, "analyst"))
    assert_error(analyst.post(f"{POS}/calculate", json={**purchase("s4"), "store": "MINI"}), 403, "forbidden")


def test_bad_cheques_are_refused(shop: dict[str, Any]) -> None:
    till = shop["hyper"]
    body = purchase("b1")
    body["cheque"]["lines"][0]["amount"] = "1.00"
    assert_error(till.post(f"{POS}/calculate", json=body), 422, "invalid_line_amount")
    body = purchase("b2")
    body["cheque"]["created_at"] = "2026-11-23T12:00:00"
    assert_error(till.post(f"{POS}/calculate", json=body), 422, "invalid_time")
    body = purchase("b3")
    body["cheque"]["lines"][0]["price"] = 100.0
    assert_error(till.post(f"{POS}/calculate", json=body), 422, "invalid_value")
    assert_error(till.post(f"{POS}/confirm", json={"operation_id": "nope"}), 404, "unknown_operation")


def test_balance_at_the_till(shop: dict[str, Any]) -> None:
    answer = ok(shop["hyper"].get(f"{POS}/balance", params={"card": "1000"}))
    assert answer["balance"][0]["available"] == "100.00" and answer["member"]["card"] == "1000"
    assert_error(shop["hyper"].get(f"{POS}/balance"), 400, "identifier_required")


def test_parallel_write_offs_never_overspend(api: Api, db: Database, shop: dict[str, Any]) -> None:
    add_offer(
        db,
        "pay all",
        [
            {
                "event": "write_off",
                "filters": [],
                "actions": [{"type": "write_off_rule", "max_percent": "100"}],
            }
        ],
    )
    till = shop["hyper"]
    outcomes: list[int] = []
    lock = threading.Lock()

    def spend(n: int) -> None:
        response = till.post(f"{POS}/calculate", json=purchase(f"par{n}", write_off="7"))
        if response.status_code == 200:
            confirmed = till.post(f"{POS}/confirm", json={"operation_id": f"par{n}"})
            assert confirmed.status_code == 200, confirmed.text
        else:
            assert response.json()["error"]["code"] in {"insufficient_points", "write_off_limit_exceeded"}
        with lock:
            outcomes.append(response.status_code)

    threads = [threading.Thread(target=spend, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(200) == 14  # 14 × 7 = 98 ≤ 100 < 15 × 7
    balance = balance_of(api, shop["member"])
    assert balance == {"available": D(2), "pending": D(0), "reserved": D(0)}


def test_offer_period_is_store_local_time(api: Api, db: Database, shop: dict[str, Any]) -> None:
    add_offer(db, "from noon", HYPER_10, starts_at=datetime(2026, 11, 23, 12, 0))
    till = shop["hyper"]
    before = ok(till.post(f"{POS}/calculate", json=purchase("t1", created_at="2026-11-23T11:59:00+03:00")))
    after = ok(till.post(f"{POS}/calculate", json=purchase("t2", created_at="2026-11-23T09:00:00+00:00")))
    assert before["totals"]["discount"] == "0.00" and after["totals"]["discount"] == "20.00"


def test_each_offer_spends_only_the_discount_it_gave(api: Api, db: Database, shop: dict[str, Any]) -> None:
    """An offer's money budget counts what that offer took off the cheque: a bonus offer on the
    same lines spends no money, and two summable discounts each count their own part (offers
    without a budget keep no spending counters)."""
    ten = add_offer(db, "10% in hypermarkets", HYPER_10, summable=True, budget_money=D("1000"))
    fixed = add_offer(
        db,
        "15 off",
        [
            {
                "event": "discount_calculation",
                "filters": [],
                "actions": [{"type": "discount", "kind": "amount", "value": "15"}],
            }
        ],
        summable=True,
        budget_money=D("1000"),
    )
    earn = add_offer(db, "5% back", EARN_5, summable=True, budget_money=D("1000"), budget_points=D("1000"))
    answer = ok(shop["hyper"].post(f"{POS}/calculate", json=purchase("s1")))
    assert answer["totals"]["discount"] == "35.00"  # 20 + 15 on a 200 cheque
    ok(shop["hyper"].post(f"{POS}/confirm", json={"operation_id": "s1"}))
    spent = {i: ok(api.get(f"{ADMIN}/offers/{i}")) for i in (ten, fixed, earn)}
    assert spent[ten]["spent_money"] == "20.00" and spent[fixed]["spent_money"] == "15.00"
    assert spent[earn]["spent_money"] == "0.00" and D(spent[earn]["spent_points"]) > 0


def test_a_write_off_rule_counts_a_use_only_when_points_pay(
    api: Api, db: Database, shop: dict[str, Any]
) -> None:
    """ "Pay with points once per member": purchases paid in money do not use that once up."""
    add_offer(db, "pay half, once", PAY_50, max_uses_per_member=1)
    till = shop["hyper"]
    for operation in ("m1", "m2"):
        answer = ok(till.post(f"{POS}/calculate", json=purchase(operation)))
        assert answer["max_write_off"] == {"bonus": "100.00"}
        ok(till.post(f"{POS}/confirm", json={"operation_id": operation}))
    ok(till.post(f"{POS}/calculate", json=purchase("p1", write_off="30")))
    ok(till.post(f"{POS}/confirm", json={"operation_id": "p1"}))
    # The one use is spent now: no more paying with points.
    assert ok(till.post(f"{POS}/calculate", json=purchase("p2")))["max_write_off"] in ({}, {"bonus": "0"})
