"""Loyalty changes write their event to the outbox in the same transaction (docs/events.md)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D
from typing import Any

import pytest

from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.ledger import service as ledger
from omniloyal.offers.models import Offer
from tests.conftest import Api, assert_error, make_key
from tests.events.bus_helpers import one, outbox

ADMIN = "/api/v1/admin"
POS = "/api/v1/pos"
NOON = "2026-11-23T12:00:00+03:00"


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def member_body(phone: str = "+79123456789", card: str = "1000") -> dict[str, Any]:
    return {
        "first_name": "Anna",
        "last_name": "Petrova",
        "gender": "female",
        "birth_date": "1990-05-17",
        "city": "Kazan",
        "phone": phone,
        "email": "anna@example.com",
        "pets": ["cat"],
        "consents": {"email": True, "sms": {"granted": False, "source": "pos"}},
        "cards": [{"number": card, "kind": "physical", "state": "activated"}],
    }


@pytest.fixture
def shop(api: Api, db: Database) -> dict[str, Any]:
    """A store with two products, 5 % back, paying up to half with points, a member with 100 points."""
    ok(api.post(f"{ADMIN}/legal-entities", json={"code": "LE", "name": "Retail LLC"}), 201)
    ok(
        api.post(
            f"{ADMIN}/stores",
            json={"code": "HYPER", "name": "Hyper", "legal_entity": "LE", "channel": "offline"},
        ),
        201,
    )
    ok(api.post(f"{ADMIN}/payment-methods", json={"code": "card", "name": "Card"}), 201)
    ok(
        api.post(
            f"{ADMIN}/products",
            json={"sku": "MILK", "name": "Milk", "price": "100.00", "category": "Food / Dairy / Milk"},
        ),
        201,
    )
    member = ok(api.post(f"{ADMIN}/members", json=member_body()), 201)
    ok(
        api.post(
            f"{ADMIN}/members/{member['id']}/ledger",
            json={"kind": "accrual", "amount": "100", "reason": "welcome"},
        ),
        201,
    )
    with db.transaction() as session:
        session.add(
            Offer(
                name="5% back",
                status="active",
                summable=True,
                chains=[
                    {
                        "event": "bonus_calculation",
                        "filters": [],
                        "actions": [{"type": "bonus", "kind": "percent", "value": "5"}],
                    }
                ],
            )
        )
        session.add(
            Offer(
                name="pay half",
                status="active",
                chains=[
                    {
                        "event": "write_off",
                        "filters": [],
                        "actions": [{"type": "write_off_rule", "currency": "bonus", "max_percent": "50"}],
                    }
                ],
            )
        )
    return {"member": member["id"], "till": api.as_key(make_key(db, "pos", store="HYPER"))}


def cheque(operation: str, *, write_off: str | None = None, card: str | None = "1000") -> dict[str, Any]:
    body: dict[str, Any] = {
        "operation_id": operation,
        "cheque": {
            "number": f"C-{operation}",
            "created_at": NOON,
            "lines": [
                {"line": 1, "sku": "MILK", "price": "100.00", "quantity": "2", "amount": "200.00"},
                {"line": 2, "sku": "BREAD", "price": "50.00", "quantity": "1", "amount": "50.00"},
            ],
            "payments": [{"method": "card", "amount": "250.00"}],
        },
    }
    if card:
        body["identifier"] = {"card": card}
    if write_off:
        body["write_off"] = {"currency": "bonus", "amount": write_off}
    return body


def test_a_pos_confirm_writes_exactly_one_purchase_confirmed(
    api: Api, db: Database, shop: dict[str, Any]
) -> None:
    till = shop["till"]
    ok(till.post(f"{POS}/calculate", json=cheque("p1", write_off="50")))
    assert outbox(db, "purchase.confirmed") == []  # a calculation is no purchase yet
    confirmed = ok(till.post(f"{POS}/confirm", json={"operation_id": "p1"}))
    ok(till.post(f"{POS}/confirm", json={"operation_id": "p1"}))  # a repeat adds nothing
    event = one(db, "purchase.confirmed")
    assert event["id"].startswith("purchase.confirmed:")
    assert event["member_id"] == shop["member"]
    assert (event["source"], event["store"]) == ("offline", "HYPER")
    assert event["occurred_at"].startswith("2026-11-23T09:00:00")
    props = event["properties"]
    assert set(props) == {
        "operation",
        "operation_id",
        "kind",
        "channel",
        "cheque_number",
        "amount",
        "discount",
        "paid",
        "write_off",
        "accrual",
        "payments",
        "lines",
    }
    assert props["operation_id"] == "p1" and props["kind"] == "purchase" and props["channel"] == "offline"
    assert props["cheque_number"] == "C-p1"
    assert (props["amount"], props["discount"], props["paid"]) == ("250.00", "0.00", "200.00")
    assert D(props["write_off"]["bonus"]) == D(50)
    assert D(props["accrual"]["bonus"]) == D(confirmed["accrued"]["bonus"]) == D(10)
    assert props["payments"] == [{"method": "card", "amount": "250.00"}]
    assert props["lines"] == [
        {
            "line": 1,
            "sku": "MILK",
            "category": "Food / Dairy / Milk",
            "price": "100.00",
            "quantity": "2.000",
            "amount": "200.00",
            "discount": "0.00",
        },
        {
            "line": 2,
            "sku": "BREAD",  # not in the catalogue: no category
            "category": None,
            "price": "50.00",
            "quantity": "1.000",
            "amount": "50.00",
            "discount": "0.00",
        },
    ]
    # The ledger entries of the confirm: one event each, same transaction.
    spent = one(db, "points.written_off")["properties"]
    assert (spent["source"], D(spent["amount"]), spent["currency"]) == ("purchase", D(50), "bonus")
    earned = [e for e in outbox(db, "points.accrued") if e.properties["source"] == "purchase"]
    assert len(earned) == 1 and D(earned[0].properties["amount"]) == D(10)


def test_refund_and_offline_cheques_write_their_events(api: Api, db: Database, shop: dict[str, Any]) -> None:
    till = shop["till"]
    ok(till.post(f"{POS}/calculate", json=cheque("p1")))
    ok(till.post(f"{POS}/confirm", json={"operation_id": "p1"}))
    ok(
        till.post(
            f"{POS}/refund",
            json={
                "operation_id": "p1-back",
                "purchase_operation_id": "p1",
                "lines": [{"line": 1, "quantity": "1"}],
            },
        )
    )
    refund = one(db, "purchase.refunded")
    purchase_event = one(db, "purchase.confirmed")
    assert refund["member_id"] == shop["member"]
    assert refund["properties"]["purchase_operation"] == purchase_event["properties"]["operation"]
    assert refund["properties"]["operation_id"] == "p1-back"
    assert refund["properties"]["amount"] == "100.00"
    (line,) = refund["properties"]["lines"]
    assert (line["line"], line["sku"], D(line["quantity"]), line["amount"]) == (1, "MILK", D(1), "100.00")
    offline = {k: v for k, v in cheque("off1").items() if k != "write_off"}
    ok(till.post(f"{POS}/offline-cheques", json={"cheques": [offline]}))
    events = outbox(db, "purchase.confirmed")
    assert len(events) == 2 and events[1].properties["kind"] == "offline"
    assert events[1].properties["operation_id"] == "off1" and events[1].member_id == shop["member"]


def test_an_anonymous_purchase_has_no_member(api: Api, db: Database, shop: dict[str, Any]) -> None:
    till = shop["till"]
    ok(till.post(f"{POS}/calculate", json=cheque("anon", card=None)))
    ok(till.post(f"{POS}/confirm", json={"operation_id": "anon"}))
    event = one(db, "purchase.confirmed")
    assert event["member_id"] is None and event["properties"]["accrual"] == {}


def test_a_change_that_rolls_back_writes_no_event(api: Api, db: Database, shop: dict[str, Any]) -> None:
    before = len(outbox(db))
    with pytest.raises(RuntimeError), db.transaction() as session:
        ledger.accrue(session, member_id=shop["member"], currency="bonus", amount=D(5), source="manual")
        raise RuntimeError("the rest of the change failed")
    # Refused requests change nothing, events included.
    assert_error(api.post(f"{ADMIN}/members", json=member_body(card="2000")), 409, "duplicate_identifier")
    till = shop["till"]
    ok(till.post(f"{POS}/calculate", json=cheque("c1")))
    ok(till.post(f"{POS}/cancel", json={"operation_id": "c1"}))
    assert_error(till.post(f"{POS}/confirm", json={"operation_id": "c1"}), 409, "operation_cancelled")
    assert len(outbox(db)) == before


def test_member_and_card_events(api: Api, db: Database) -> None:
    member = ok(api.post(f"{ADMIN}/members", json=member_body()), 201)
    registered = one(db, "member.registered")
    assert registered["id"] == f"member.registered:{member['id']}"
    questionnaire = registered["properties"]["member"]
    assert questionnaire["first_name"] == "Anna" and questionnaire["phone"] == "+79123456789"
    assert questionnaire["birth_date"] == "1990-05-17" and questionnaire["pets"] == ["cat"]
    assert questionnaire["consents"]["email"]["granted"] is True
    assert questionnaire["consents"]["sms"] == {
        "granted": False,
        "at": questionnaire["consents"]["sms"]["at"],
        "source": "pos",
    }
    activated = one(db, "card.activated")
    assert activated["member_id"] == member["id"]
    assert activated["properties"] == {"card": "1000", "kind": "physical"}

    ok(api.patch(f"{ADMIN}/members/{member['id']}", json={"city": "Samara", "last_name": "Petrova"}))
    updated = one(db, "member.updated")
    assert updated["properties"]["changed"] == ["city"]  # the name was already that
    assert updated["properties"]["member"]["city"] == "Samara"
    ok(api.patch(f"{ADMIN}/members/{member['id']}", json={"city": "Samara"}))
    assert len(outbox(db, "member.updated")) == 1  # nothing changed: no event

    ok(api.put(f"{ADMIN}/members/{member['id']}/consents", json={"sms": {"granted": True, "source": "web"}}))
    consent = one(db, "consent.changed")
    assert consent["properties"] == {"channel": "sms", "granted": True, "source": "web"}

    ok(api.post(f"{ADMIN}/cards/1000/block", json={"reason": "lost"}))
    blocked = one(db, "card.blocked")
    assert blocked["member_id"] == member["id"]
    assert blocked["properties"] == {"card": "1000", "kind": "physical", "reason": "lost"}
    ok(api.post(f"{ADMIN}/cards/1000/unblock"))
    ok(api.post(f"{ADMIN}/cards/1000/block", json={"reason": "damaged"}))
    assert len(outbox(db, "card.blocked")) == 2 and len(outbox(db, "card.unblocked")) == 1
    ok(api.post(f"{ADMIN}/cards/1000/replace", json={"new_number": "1001"}))
    replaced = one(db, "card.replaced")
    assert replaced["properties"] == {"card": "1000", "kind": "physical", "new_card": "1001"}


def test_ledger_events_one_per_entry(api: Api, db: Database) -> None:
    ok(api.post(f"{ADMIN}/legal-entities", json={"code": "LE", "name": "Retail LLC"}), 201)
    member = ok(api.post(f"{ADMIN}/members", json=member_body()), 201)
    result = ok(
        api.post(
            f"{ADMIN}/members/{member['id']}/ledger",
            json={"kind": "accrual", "amount": "30", "reason": "sorry for the wait", "lifetime_days": 10},
        ),
        201,
    )
    accrued = one(db, "points.accrued")
    assert accrued["id"] == f"points.accrued:{result['entry']['id']}"
    assert accrued["member_id"] == member["id"]
    props = accrued["properties"]
    assert (props["currency"], D(props["amount"]), props["entry"]) == ("bonus", D(30), result["entry"]["id"])
    assert (props["source"], props["reason"]) == ("manual", "sorry for the wait")
    ok(
        api.post(
            f"{ADMIN}/members/{member['id']}/ledger",
            json={"kind": "write_off", "amount": "12", "reason": "gift"},
        ),
        201,
    )
    assert D(one(db, "points.written_off")["properties"]["amount"]) == D(12)
    ledger.run_jobs(db, utcnow() + timedelta(days=11))
    expired = one(db, "points.expired")
    assert D(expired["properties"]["amount"]) == D(18) and expired["member_id"] == member["id"]


def test_target_audience_changes(api: Api, db: Database) -> None:
    ids = [ok(api.post(f"{ADMIN}/members", json={"first_name": f"M{i}"}), 201)["id"] for i in range(3)]
    ok(api.post(f"{ADMIN}/audiences", json={"code": "vip", "name": "VIP"}), 201)
    ok(api.post(f"{ADMIN}/audiences/vip/members", json={"mode": "add", "member_ids": ids[:2]}))
    ok(api.post(f"{ADMIN}/audiences/vip/members", json={"mode": "replace", "member_ids": ids[1:]}))
    ok(api.post(f"{ADMIN}/audiences/vip/members", json={"mode": "add", "member_ids": ids[1:]}))  # no change
    changes = outbox(db, "target_audience.changed")
    assert [(e.properties["added"], e.properties["removed"]) for e in changes] == [(2, 0), (1, 1)]
    assert changes[0].properties["code"] == "vip" and changes[0].member_id is None
