"""The ledger over HTTP: currencies, manual accruals and write-offs, balance, history, emission accounts."""

from __future__ import annotations

from decimal import Decimal

from omniloyal.db.engine import Database
from tests.conftest import Api, assert_error, make_key
from tests.ledger.helpers import (
    ADMIN,
    balance_of,
    check_books,
    history,
    legal_entity,
    member,
    ok,
    post_ledger,
    snapshot,
)


def test_default_currency_exists_and_new_ones_are_admin_only(api: Api, db: Database) -> None:
    assert [c["code"] for c in ok(api.get(f"{ADMIN}/currencies"))["items"]] == ["bonus"]
    stars = ok(api.post(f"{ADMIN}/currencies", json={"code": "stars", "name": "Stars", "precision": 0}), 201)
    assert stars["precision"] == 0
    assert_error(
        api.post(f"{ADMIN}/currencies", json={"code": "stars", "name": "Again"}),
        409,
        "duplicate_currency",
        "code",
    )
    assert_error(
        api.post(f"{ADMIN}/currencies", json={"code": "gems", "name": "G", "precision": 5}),
        422,
        "invalid_precision",
        "precision",
    )
    assert_error(
        api.post(f"{ADMIN}/currencies", json={"code": "Bad Code", "name": "x"}), 422, "invalid_code", "code"
    )
    operator = api.as_key(make_key(db, "operator"))
    assert_error(
        operator.post(f"{ADMIN}/currencies", json={"code": "chips", "name": "Chips"}), 403, "forbidden"
    )
    # Everyone may read them, page by page.
    first = ok(operator.get(f"{ADMIN}/currencies", params={"limit": 1}))
    second = ok(operator.get(f"{ADMIN}/currencies", params={"limit": 1, "cursor": first["next_cursor"]}))
    assert [c["code"] for c in first["items"] + second["items"]] == ["bonus", "stars"]
    assert second["next_cursor"] is None
    audit = ok(api.get(f"{ADMIN}/audit", params={"entity": "currency"}))["items"]
    assert [(a["action"], a["entity_id"]) for a in audit] == [("create", "stars")]


def test_accrue_write_off_balance_and_history(api: Api, db: Database) -> None:
    legal_entity(db)
    member_id = member(db)
    accrued = ok(
        post_ledger(api, member_id, kind="accrual", amount="100.50", reason="welcome", lifetime_days=30), 201
    )
    assert accrued["entry"]["amount"] == "100.50"
    assert accrued["entry"]["expires_at"] is not None
    assert accrued["balance"]["available"] == "100.50"
    spent = ok(post_ledger(api, member_id, kind="write_off", amount="40.25", reason="goodwill fix"), 201)
    assert spent["entry"]["amount"] == "-40.25"
    assert spent["balance"] == balance_of(api, member_id)
    assert balance_of(api, member_id)["available"] == "60.25"
    assert balance_of(api, member_id)["total"] == "60.25"
    assert balance_of(api, member_id)["next_expiries"][0]["amount"] == "60.25"

    items = history(api, member_id)
    assert [(i["kind"], i["amount"], i["reason"]) for i in items] == [
        ("write_off", "-40.25", "goodwill fix"),
        ("accrual", "100.50", "welcome"),
    ]
    assert all(i["source"] == "manual" and i["actor"] == "admin:test admin" for i in items)
    assert items[1]["legal_entity"] == "LE1"
    # The write-off says which lot paid.
    assert items[0]["lots"] == [
        {**items[1]["lots"][0], "amount": "-40.25"},
    ]
    audit = ok(api.get(f"{ADMIN}/audit", params={"entity": "member", "entity_id": str(member_id)}))["items"]
    assert [a["action"] for a in audit] == ["write_off", "accrual"]
    assert audit[0]["before"]["balance"]["available"] == "100.50"
    assert audit[0]["after"]["balance"]["available"] == "60.25"
    check_books(db, [member_id])


def test_activation_delay_keeps_points_pending(api: Api, db: Database) -> None:
    legal_entity(db)
    member_id = member(db)
    ok(
        post_ledger(api, member_id, kind="accrual", amount="70", activation_delay_days=2, lifetime_days=10),
        201,
    )
    assert balance_of(api, member_id) | {"next_expiries": []} == {
        "currency": "bonus",
        "available": "0.00",
        "pending": "70.00",
        "reserved": "0.00",
        "total": "70.00",
        "next_expiries": [],
    }
    body = assert_error(
        post_ledger(api, member_id, kind="write_off", amount="1"), 409, "insufficient_points", "amount"
    )
    assert body["error"]["details"]["available"] == "0.00"


def test_refusals_have_codes_and_change_nothing(api: Api, db: Database) -> None:
    legal_entity(db)
    member_id = member(db)
    ok(api.post(f"{ADMIN}/currencies", json={"code": "stars", "name": "Stars", "precision": 0}), 201)
    ok(post_ledger(api, member_id, kind="accrual", amount="10"), 201)
    before = snapshot(db, member_id)

    assert_error(post_ledger(api, 999_999, kind="accrual", amount="5"), 404, "unknown_member")
    assert_error(
        post_ledger(api, member_id, kind="accrual", amount="5", currency="gold"), 404, "unknown_currency"
    )
    assert_error(post_ledger(api, member_id, kind="accrual", amount="0"), 400, "invalid_amount", "amount")
    assert_error(post_ledger(api, member_id, kind="write_off", amount="-3"), 400, "invalid_amount", "amount")
    assert_error(post_ledger(api, member_id, kind="accrual", amount="1.001"), 400, "invalid_amount", "amount")
    assert_error(
        post_ledger(api, member_id, kind="accrual", amount="1.5", currency="stars"),
        400,
        "invalid_amount",
        "amount",
    )
    assert_error(post_ledger(api, member_id, kind="accrual", amount=1.5), 422, "invalid_value", "amount")
    body = assert_error(
        post_ledger(api, member_id, kind="write_off", amount="10.01"), 409, "insufficient_points"
    )
    assert body["error"]["details"] == {"available": "10.00", "requested": "10.01", "currency": "bonus"}
    assert_error(
        post_ledger(api, member_id, kind="write_off", amount="1", lifetime_days=3),
        400,
        "accrual_only",
        "lifetime_days",
    )
    assert_error(
        post_ledger(api, member_id, kind="accrual", amount="1", lifetime_days=0),
        400,
        "invalid_lifetime",
        "lifetime_days",
    )
    assert_error(
        post_ledger(api, member_id, kind="accrual", amount="1", legal_entity="nope"),
        404,
        "unknown_legal_entity",
        "legal_entity",
    )
    assert_error(post_ledger(api, member_id, kind="gift", amount="1"), 422, "invalid_choice", "kind")
    no_reason = api.post(f"{ADMIN}/members/{member_id}/ledger", json={"kind": "accrual", "amount": "1"})
    assert_error(no_reason, 422, "missing_field", "reason")
    assert_error(post_ledger(api, member_id, kind="accrual", amount="1", reason="  "), 422, "missing_reason")

    assert snapshot(db, member_id) == before
    assert len(history(api, member_id)) == 1


def test_accrual_needs_a_legal_entity(api: Api, db: Database) -> None:
    member_id = member(db)
    assert_error(post_ledger(api, member_id, kind="accrual", amount="5"), 409, "no_legal_entity")
    legal_entity(db, "SIDE", default=False)
    assert_error(post_ledger(api, member_id, kind="accrual", amount="5"), 409, "no_legal_entity")
    ok(post_ledger(api, member_id, kind="accrual", amount="5", legal_entity="SIDE"), 201)


def test_roles_and_member_scope(api: Api, db: Database) -> None:
    legal_entity(db)
    own, other = member(db), member(db)
    operator = api.as_key(make_key(db, "operator"))
    ok(post_ledger(operator, own, kind="accrual", amount="5"), 201)
    marketer = api.as_key(make_key(db, "marketer"))
    assert_error(post_ledger(marketer, own, kind="accrual", amount="5"), 403, "forbidden")
    assert balance_of(marketer, own)["available"] == "5.00"
    analyst = api.as_key(make_key(db, "analyst"))
    assert len(history(analyst, own)) == 1
    client = api.as_key(make_key(db, "client", member_id=own))
    assert balance_of(client, own)["available"] == "5.00"
    assert len(history(client, own)) == 1
    assert_error(client.get(f"{ADMIN}/members/{other}/balance"), 403, "forbidden")
    assert_error(client.get(f"{ADMIN}/members/{other}/history"), 403, "forbidden")
    assert_error(post_ledger(client, own, kind="accrual", amount="5"), 403, "forbidden")
    assert_error(api.get(f"{ADMIN}/members/999999/balance"), 404, "unknown_member")


def test_history_filters_and_pages(api: Api, db: Database) -> None:
    legal_entity(db)
    member_id = member(db)
    ok(api.post(f"{ADMIN}/currencies", json={"code": "stars", "name": "Stars", "precision": 0}), 201)
    for amount in ("1", "2", "3"):
        ok(post_ledger(api, member_id, kind="accrual", amount=amount), 201)
    ok(post_ledger(api, member_id, kind="accrual", amount="7", currency="stars"), 201)
    ok(post_ledger(api, member_id, kind="write_off", amount="4"), 201)

    assert [i["amount"] for i in history(api, member_id, currency="stars")] == ["7"]
    assert [i["amount"] for i in history(api, member_id, kind="write_off")] == ["-4.00"]
    seen: list[str] = []
    cursor = None
    while True:
        page = ok(
            api.get(
                f"{ADMIN}/members/{member_id}/history",
                params={"limit": 2, **({"cursor": cursor} if cursor else {})},
            )
        )
        seen += [i["amount"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ["-4.00", "7", "3.00", "2.00", "1.00"]
    # A write-off over several lots shows each lot's share, oldest first (none expires).
    assert [share["amount"] for share in history(api, member_id, kind="write_off")[0]["lots"]] == [
        "-1.00",
        "-2.00",
        "-1.00",
    ]
    assert_error(
        api.get(f"{ADMIN}/members/{member_id}/history", params={"currency": "gold"}), 404, "unknown_currency"
    )
    assert_error(
        api.get(f"{ADMIN}/members/{member_id}/history", params={"kind": "gift"}),
        422,
        "invalid_choice",
        "kind",
    )
    assert_error(api.get(f"{ADMIN}/members/999999/history"), 404, "unknown_member")
    balances = ok(api.get(f"{ADMIN}/members/{member_id}/balance"))["balances"]
    assert [(b["currency"], b["available"]) for b in balances] == [("bonus", "2.00"), ("stars", "7")]


def test_emission_accounts_show_points_issued(api: Api, db: Database) -> None:
    legal_entity(db, "LE1")
    legal_entity(db, "LE2", default=False)
    member_id = member(db)
    ok(post_ledger(api, member_id, kind="accrual", amount="100"), 201)
    ok(post_ledger(api, member_id, kind="accrual", amount="50", legal_entity="LE2", lifetime_days=5), 201)
    # The LE2 lot expires first, so it pays first; the rest comes from LE1.
    ok(post_ledger(api, member_id, kind="write_off", amount="60"), 201)

    def issued(code: str) -> dict[str, Decimal]:
        items = ok(api.get(f"{ADMIN}/legal-entities/{code}/accounts"))["items"]
        return {i["currency"]: Decimal(i["balance"]) for i in items}

    assert issued("LE1") == {"bonus": Decimal("-90")}
    assert issued("LE2") == {"bonus": Decimal("0")}
    assert_error(api.get(f"{ADMIN}/legal-entities/NOPE/accounts"), 404, "unknown_legal_entity")
    marketer = api.as_key(make_key(db, "marketer"))
    assert_error(marketer.get(f"{ADMIN}/legal-entities/LE1/accounts"), 403, "forbidden")
    check_books(db, [member_id])
