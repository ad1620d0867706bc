"""Duplicate members: found by a shared normalised phone or e-mail, merged keeping cards, points,
history, consents and the questionnaire; the merge is an event and an audit record."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from omniloyal.db.engine import Database
from omniloyal.events.models import Event, OutboxEvent
from omniloyal.members.models import AnonymousLink, Member
from omniloyal.offers.models import Offer, OfferUse, TargetAudience, TargetAudienceMember
from tests.conftest import Api, assert_error, make_key
from tests.ledger.helpers import balance_of, check_books, history, legal_entity, ok, post_ledger
from tests.members.test_quality import with_quality_routes

ADMIN = "/api/v1/admin"
AT = "2026-11-23T10:00:00+03:00"


@pytest.fixture
def admin(api: Api, app: Any) -> Api:
    return with_quality_routes(api, app)


def _new(api: Api, **fields: Any) -> int:
    created = api.post(f"{ADMIN}/members", json=fields)
    assert created.status_code == 201, created.text
    member_id: int = created.json()["id"]
    return member_id


def _merge(api: Api, kept: int, duplicate: int) -> Any:
    return api.post(f"{ADMIN}/members/{kept}/merge", json={"duplicate_id": duplicate})


def test_duplicates_are_found_by_normalised_phone_or_email(admin: Api, db: Database) -> None:
    definition = {"code": "second_phone", "name": "Second phone", "type": "string"}
    assert admin.post(f"{ADMIN}/attribute-definitions", json=definition).status_code == 201
    ivan = _new(admin, first_name="Иван", email="Ivan.Petrov@gmail.com", phone="+7 916 555-12-34")
    ivan_again = _new(admin, first_name="Ваня", email="ivanpetrov+shop@googlemail.com")
    olga = _new(admin, first_name="Ольга", phone="+7 916 555-77-88")
    olga_form = _new(admin, first_name="Ольга", attributes={"second_phone": "8 (916) 555-77-88"})
    _new(admin, first_name="Пётр", email="petr@yandex.ru", phone="+7 903 555-00-11")
    page = admin.get(f"{ADMIN}/members/duplicates")
    assert page.status_code == 200, page.text
    pairs = [(p["member_id"], p["duplicate_id"], p["shared"]) for p in page.json()["items"]]
    assert pairs == [
        (ivan, ivan_again, [{"kind": "email", "value": "ivanpetrov@gmail.com"}]),
        (olga, olga_form, [{"kind": "phone", "value": "+79165557788"}]),
    ]
    first = page.json()["items"][0]["members"]
    assert [m["first_name"] for m in first] == ["Иван", "Ваня"]
    one = admin.get(f"{ADMIN}/members/duplicates", params={"limit": 1}).json()
    assert len(one["items"]) == 1 and one["next_cursor"]
    rest = admin.get(f"{ADMIN}/members/duplicates", params={"limit": 1, "cursor": one["next_cursor"]}).json()
    assert [p["duplicate_id"] for p in rest["items"]] == [olga_form] and rest["next_cursor"] is None
    assert_error(admin.get(f"{ADMIN}/members/duplicates", params={"cursor": "zzz"}), 400, "invalid_cursor")
    # Once merged, a pair is no longer offered.
    assert _merge(admin, olga, olga_form).status_code == 200
    left = admin.get(f"{ADMIN}/members/duplicates").json()["items"]
    assert [(p["member_id"], p["duplicate_id"]) for p in left] == [(ivan, ivan_again)]


def _setup_pair(admin: Api, db: Database) -> tuple[int, int]:
    legal_entity(db)
    kept = _new(
        admin,
        first_name="Иван",
        phone="+7 916 555-12-34",
        attributes={},
        pets=["cat"],
        consents={"email": True},
        cards=[{"number": "A100", "kind": "virtual", "state": "activated"}],
    )
    duplicate = _new(
        admin,
        first_name="Ваня",
        last_name="Петров",
        birth_date="1990-05-17",
        phone="+7 903 555-00-11",
        email="ivan.petrov@mail.ru",
        pets=["dog", "cat"],
        registered_at="2020-01-01T00:00:00Z",
        cards=[
            {"number": "B200", "kind": "virtual", "state": "activated"},
            {"number": "B300", "kind": "physical", "state": "activated"},
        ],
    )
    # The duplicate withdrew e-mail consent after the kept member gave it; gave sms.
    consents = admin.put(f"{ADMIN}/members/{duplicate}/consents", json={"email": False, "sms": True})
    assert consents.status_code == 200, consents.text
    ok(post_ledger(admin, kept, kind="accrual", amount="100"), 201)
    ok(post_ledger(admin, duplicate, kind="accrual", amount="50", lifetime_days=30), 201)
    ok(post_ledger(admin, duplicate, kind="write_off", amount="20"), 201)
    with db.transaction() as session:
        offer = Offer(name="Once", status="active", chains=[])
        audience = TargetAudience(code="VIP", name="VIP")
        other = TargetAudience(code="NEW", name="New")
        session.add_all([offer, audience, other])
        session.flush()
        session.add_all(
            [
                OfferUse(offer_id=offer.id, member_id=kept, uses=1),
                OfferUse(offer_id=offer.id, member_id=duplicate, uses=2),
                TargetAudienceMember(audience_id=audience.id, member_id=kept),
                TargetAudienceMember(audience_id=audience.id, member_id=duplicate),
                TargetAudienceMember(audience_id=other.id, member_id=duplicate),
            ]
        )
    visit = {
        "id": "login-1",
        "type": "login",
        "occurred_at": AT,
        "anonymous_id": "cookie-1",
        "member": {"card": "B200"},
    }
    install = {"id": "app-1", "type": "mobile_app_installed", "occurred_at": AT, "member": {"card": "B300"}}
    assert admin.post("/api/v1/events", json=[visit, install]).json()["accepted"] == 2
    return kept, duplicate


def test_merge_keeps_cards_points_history_and_consents(admin: Api, db: Database) -> None:
    kept, duplicate = _setup_pair(admin, db)
    entries_before = len(history(admin, kept)) + len(history(admin, duplicate))
    answer = _merge(admin, kept, duplicate)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["kept_member_id"] == kept and body["merged_member_id"] == duplicate
    assert body["deactivated_cards"] == ["B200"]
    assert {"last_name", "birth_date", "email", "pets", "registered_at"} <= set(body["filled"])
    assert body["moved"]["cards"] == 2 and body["moved"]["lots"] == 1

    # Cards: the kept virtual card stays the active one, the duplicate's physical card too.
    member = admin.get(f"{ADMIN}/members/{kept}").json()
    cards = {c["number"]: c["state"] for c in member["cards"]}
    assert cards == {"A100": "activated", "B200": "issued", "B300": "activated"}
    # Points: balances add up, history explains them, the books still balance.
    assert balance_of(admin, kept)["available"] == "130.00"
    assert len(history(admin, kept)) == entries_before
    check_books(db, [kept, duplicate])
    # Questionnaire: kept values win, gaps filled, lists united, the earlier registration stays.
    assert (member["first_name"], member["last_name"], member["birth_date"]) == (
        "Иван",
        "Петров",
        "1990-05-17",
    )
    assert member["phone"] == "+79165551234" and member["email"] == "ivan.petrov@mail.ru"
    assert member["pets"] == ["cat", "dog"]
    assert member["registered_at"].startswith("2020-01-01")
    # Consents: the latest decision per channel.
    assert member["consents"]["email"]["granted"] is False and member["consents"]["sms"]["granted"] is True
    # The duplicate is marked, and answers with the kept member.
    gone = admin.get(f"{ADMIN}/members/{duplicate}").json()
    assert gone["status"] == "merged" and gone["cards"] == [] and gone["email"] is None
    assert admin.get(f"{ADMIN}/members/lookup", params={"card": "B300"}).json()["id"] == kept
    assert admin.get(f"{ADMIN}/members/lookup", params={"email": "Ivan.Petrov@mail.ru"}).json()["id"] == kept
    with db.reading() as session:
        merged = session.get(Member, duplicate)
        assert merged is not None and merged.merged_into_id == kept
        assert session.scalar(select(Event.member_id).where(Event.id == "app-1")) == kept
        links = session.execute(select(AnonymousLink.anonymous_id, AnonymousLink.member_id)).all()
        assert [tuple(r) for r in links] == [("cookie-1", kept)]
        uses = session.execute(select(OfferUse.member_id, OfferUse.uses)).all()
        assert [tuple(r) for r in uses] == [(kept, 3)]
        audiences = session.scalar(
            select(func.count())
            .select_from(TargetAudienceMember)
            .where(TargetAudienceMember.member_id == kept)
        )
        assert audiences == 2
        assert session.scalar(select(func.count()).where(TargetAudienceMember.member_id == duplicate)) == 0
        [(event_member, payload)] = session.execute(
            select(OutboxEvent.member_id, OutboxEvent.payload).where(OutboxEvent.type == "member.merged")
        ).all()
    assert event_member == kept
    assert payload["properties"] | {"moved": None} == {
        "merged_member_id": duplicate,
        "kept_member_id": kept,
        "moved": None,
    }
    audit = admin.get("/api/v1/admin/audit", params={"entity": "member", "entity_id": str(kept)}).json()
    assert audit["items"][0]["action"] == "merge"
    # Events sent later with the duplicate's identifiers land on the kept member.
    late = {"id": "late-1", "type": "page_view", "occurred_at": AT, "member": {"id": duplicate}}
    assert admin.post("/api/v1/events", json=[late]).json()["accepted"] == 1
    with db.reading() as session:
        assert session.scalar(select(OutboxEvent.member_id).where(OutboxEvent.event_id == "late-1")) == kept


def test_merge_refusals_change_nothing(admin: Api, db: Database) -> None:
    kept, duplicate = _setup_pair(admin, db)
    assert_error(_merge(admin, kept, kept), 400, "same_member", "duplicate_id")
    assert_error(_merge(admin, kept, 999_999), 404, "unknown_member", "duplicate_id")
    assert_error(_merge(admin, 999_999, duplicate), 404, "unknown_member")
    marketer = admin.as_key(make_key(db, "marketer"))
    assert_error(_merge(marketer, kept, duplicate), 403, "forbidden")
    assert balance_of(admin, duplicate)["available"] == "30.00"
    assert _merge(admin, kept, duplicate).status_code == 200
    assert_error(_merge(admin, kept, duplicate), 409, "member_merged", "duplicate_id")
    assert_error(_merge(admin, duplicate, kept), 409, "member_merged")
    # A merged member's account is gone into the kept one: nothing left to spend twice.
    assert balance_of(admin, kept)["available"] == "130.00"


def test_merging_into_a_member_without_points_hands_the_account_over(admin: Api, db: Database) -> None:
    legal_entity(db)
    kept = _new(admin, first_name="Anna")
    duplicate = _new(admin, first_name="Anya", email="anna@example.ru")
    ok(post_ledger(admin, duplicate, kind="accrual", amount="40"), 201)
    body = ok(_merge(admin, kept, duplicate))
    assert body["moved"]["accounts"] == 1
    assert balance_of(admin, kept)["available"] == "40.00"
    check_books(db, [kept, duplicate])
