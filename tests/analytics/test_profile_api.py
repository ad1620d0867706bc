"""GET /api/v1/admin/members/{id}/profile and /timeline."""

from __future__ import annotations

import pytest

from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from tests.analytics.helpers import linked, purchase, refund, web
from tests.conftest import Api, assert_error, make_key

ADMIN = "/api/v1/admin"


def _member(api: Api) -> int:
    response = api.post(
        f"{ADMIN}/members",
        json={
            "first_name": "Anna",
            "last_name": "Petrova",
            "phone": "+79001234567",
            "email": "anna@example.com",
            "city": "Moscow",
            "consents": {"email": True},
            "cards": [{"number": "7001", "kind": "virtual", "state": "activated"}],
        },
    )
    assert response.status_code == 201, response.text
    member_id: int = response.json()["id"]
    return member_id


def test_profile_brings_everything_together(api: Api, wh: Warehouse) -> None:
    member_id = _member(api)
    load(
        wh,
        [
            web("a1", anonymous_id="anon-9", minutes=0),
            linked(member_id, "anon-9", minutes=1),
            purchase(1, member_id, [("milk", "Food/Dairy", "120.00")], minutes=2),
            refund(2, 1, member_id, [(1, "milk", "20.00")], minutes=3),
            web("m1", "message.opened", member_id=member_id, minutes=4, source="email", campaign="spring"),
        ],
    )
    response = api.get(f"{ADMIN}/members/{member_id}/profile", params={"limit": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["member_id"] == member_id
    assert body["questionnaire"]["first_name"] == "Anna"
    assert body["questionnaire"]["city"] == "Moscow"
    assert body["identifiers"] == {
        "member_id": member_id,
        "external_id": None,
        "phone": "+79001234567",
        "email": "anna@example.com",
        "cards": ["7001"],
        "anonymous_ids": ["anon-9"],
    }
    assert [c["number"] for c in body["cards"]] == ["7001"]
    assert isinstance(body["balances"], list)
    assert body["consents"]["email"]["granted"] is True
    assert isinstance(body["data_quality"], dict)
    features = body["features"]
    assert features["purchases_count"] == 1
    assert features["ltv"] == "100.00"
    assert features["favourite_categories"] == ["Food/Dairy"]
    assert features["last_message_opened_at"] is not None
    timeline = body["timeline"]
    assert [i["id"] for i in timeline["items"]] == [
        "m1",
        "purchase.refunded:2",
        "purchase.confirmed:1",
    ]
    assert [i["kind"] for i in timeline["items"]] == ["message", "purchase", "purchase"]
    rest = api.get(
        f"{ADMIN}/members/{member_id}/timeline", params={"limit": 3, "cursor": timeline["next_cursor"]}
    ).json()
    assert [(i["id"], i["kind"]) for i in rest["items"]] == [
        ("identity.linked:anon-9", "web"),
        ("a1", "web"),
    ]
    assert rest["items"][1]["anonymous_id"] == "anon-9"
    assert rest["items"][1]["utm"] == {"utm_source": "newsletter"}
    assert rest["next_cursor"] is None


def test_profile_of_a_member_the_warehouse_has_not_seen(api: Api, wh: Warehouse) -> None:
    member_id = _member(api)
    body = api.get(f"{ADMIN}/members/{member_id}/profile").json()
    assert body["features"] is None
    assert body["timeline"] == {"items": [], "next_cursor": None}


def test_unknown_member_and_bad_cursor(api: Api, wh: Warehouse, db: Database) -> None:
    assert_error(api.get(f"{ADMIN}/members/999999/profile"), 404, "unknown_member")
    assert_error(api.get(f"{ADMIN}/members/999999/timeline"), 404, "unknown_member")
    member_id = _member(api)
    assert_error(
        api.get(f"{ADMIN}/members/{member_id}/timeline", params={"cursor": "garbage"}),
        400,
        "invalid_cursor",
        "cursor",
    )
    analyst = api.as_key(make_key(db, "analyst"))
    assert analyst.get(f"{ADMIN}/members/{member_id}/profile").status_code == 200
    pos = api.as_key(make_key(db, "client", member_id=member_id))
    assert_error(pos.get(f"{ADMIN}/members/{member_id}/profile"), 403, "forbidden")


def test_data_quality_flags_of_the_member_record_are_shown(
    api: Api, wh: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniloyal.analytics import service
    from omniloyal.members.schemas import MemberOut

    member_id = _member(api)
    real = service.members.get_member

    class Checked(MemberOut):
        phone_status: str | None = "valid"
        email_status: str | None = "invalid"
        quality: dict[str, object] = {"email": ["typo: gmial.com"]}

    def with_flags(db: Database, member: int) -> MemberOut:
        return Checked(**real(db, member).model_dump())

    monkeypatch.setattr(service.members, "get_member", with_flags)
    body = api.get(f"{ADMIN}/members/{member_id}/profile").json()
    assert body["data_quality"] == {
        "phone_status": "valid",
        "email_status": "invalid",
        "quality": {"email": ["typo: gmial.com"]},
    }
    assert "phone_status" not in body["questionnaire"]
