"""Target audiences: lists of members offers filter on, filled by hand, by integrations or by segments."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select

from omniloyal.db.engine import Database
from omniloyal.members.models import Member
from omniloyal.offers.service import add_audience_members, remove_audience_members, replace_audience_members
from omniloyal.offers.snapshot import member_audiences
from tests.conftest import Api, assert_error, make_key

AUDIENCES = "/api/v1/admin/audiences"


def members(db: Database, count: int) -> list[int]:
    """``count`` new members, inserted in bulk; their ids in order."""
    with db.transaction() as session:
        before = session.scalar(select(Member.id).order_by(Member.id.desc()).limit(1)) or 0
        session.execute(insert(Member), [{"first_name": f"M{i}"} for i in range(count)])
        return list(session.scalars(select(Member.id).where(Member.id > before).order_by(Member.id)))


def new_audience(api: Api, code: str = "vip", name: str = "VIP customers") -> dict[str, Any]:
    response = api.post(AUDIENCES, json={"code": code, "name": name})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def change(api: Api, code: str, mode: str, ids: list[int]) -> Any:
    return api.post(f"{AUDIENCES}/{code}/members", json={"mode": mode, "member_ids": ids})


def all_member_ids(api: Api, code: str, limit: int = 500) -> list[int]:
    ids: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = api.get(f"{AUDIENCES}/{code}/members", params=params).json()
        ids += [item["member_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            return ids


def test_create_get_and_list_audiences(api: Api) -> None:
    created = new_audience(api)
    assert (created["code"], created["member_count"], created["source"]) == ("vip", 0, "api")
    assert_error(
        api.post(AUDIENCES, json={"code": "vip", "name": "Again"}), 409, "duplicate_audience", "code"
    )
    assert_error(api.post(AUDIENCES, json={"code": "has space", "name": "x"}), 422, "invalid_code", "code")
    assert_error(api.post(AUDIENCES, json={"code": "ok"}), 422, "missing_field", "name")
    new_audience(api, "new_parents", "New parents")
    assert api.get(f"{AUDIENCES}/vip").json()["name"] == "VIP customers"
    assert_error(api.get(f"{AUDIENCES}/nope"), 404, "unknown_audience")
    listed = api.get(AUDIENCES, params={"limit": 1}).json()
    assert [a["code"] for a in listed["items"]] == ["vip"] and listed["next_cursor"]
    rest = api.get(AUDIENCES, params={"limit": 1, "cursor": listed["next_cursor"]}).json()
    assert [a["code"] for a in rest["items"]] == ["new_parents"] and rest["next_cursor"] is None


def test_add_remove_replace_and_counts(api: Api, db: Database) -> None:
    ids = members(db, 10)
    new_audience(api)
    added = change(api, "vip", "add", ids[:6] + ids[:2])
    assert added.status_code == 200, added.text
    assert added.json() == {"code": "vip", "added": 6, "removed": 0, "member_count": 6}
    # Adding members already in changes nothing for them.
    assert change(api, "vip", "add", ids[4:8]).json() == {
        "code": "vip",
        "added": 2,
        "removed": 0,
        "member_count": 8,
    }
    # Removing ignores members who are not in.
    assert change(api, "vip", "remove", [ids[0], ids[9]]).json()["removed"] == 1
    assert api.get(f"{AUDIENCES}/vip").json()["member_count"] == 7
    # Replace: exactly this set afterwards, whatever was there.
    replaced = change(api, "vip", "replace", [ids[9], ids[1], ids[8]]).json()
    assert replaced == {"code": "vip", "added": 2, "removed": 6, "member_count": 3}
    assert all_member_ids(api, "vip", limit=2) == sorted([ids[1], ids[8], ids[9]])
    assert change(api, "vip", "replace", []).json()["member_count"] == 0
    assert_error(change(api, "nope", "add", ids[:1]), 404, "unknown_audience")
    assert_error(change(api, "vip", "merge", ids[:1]), 422, "invalid_choice", "mode")


def test_unknown_member_ids_are_refused_and_nothing_changes(api: Api, db: Database) -> None:
    ids = members(db, 3)
    new_audience(api)
    change(api, "vip", "add", ids[:1])
    missing = [ids[-1] + n for n in range(1, 30)]
    for mode in ("add", "replace", "remove"):
        body = assert_error(
            change(api, "vip", mode, [*ids[1:], *missing]), 404, "unknown_member", "member_ids"
        )
        details = body["error"]["details"]
        assert details["member_ids"] == missing[:10] and details["unknown_count"] == 29
    assert all_member_ids(api, "vip") == ids[:1]
    assert_error(change(api, "vip", "add", [0]), 422, "greater_than_equal", "member_ids.0")


def test_a_big_replace_is_bulk_and_capped_per_call(api: Api, db: Database) -> None:
    ids = members(db, 12_000)
    new_audience(api)
    first = change(api, "vip", "replace", ids[:10_000]).json()
    assert (first["added"], first["member_count"]) == (10_000, 10_000)
    second = change(api, "vip", "replace", ids[2_000:]).json()
    assert (second["added"], second["removed"], second["member_count"]) == (2_000, 2_000, 10_000)
    with db.reading() as session:
        assert member_audiences(session, ids[0]) == frozenset()
        assert member_audiences(session, ids[-1]) == {"vip"}
    too_many = list(range(1, 100_002))
    assert_error(change(api, "vip", "add", too_many), 422, "too_long", "member_ids")
    # Audit keeps counts, not ids.
    audit = api.get("/api/v1/admin/audit", params={"entity": "target_audience", "entity_id": "vip"}).json()
    last = audit["items"][0]
    assert last["action"] == "members_replace"
    assert last["after"] == {
        "mode": "replace",
        "given": 10_000,
        "added": 2_000,
        "removed": 2_000,
        "member_count": 10_000,
    }
    assert last["before"] == {"member_count": 10_000}


def test_service_functions_for_segments(api: Api, db: Database) -> None:
    ids = members(db, 5)
    new_audience(api, "rfm_champions", "Champions")
    with db.transaction() as session:
        result = replace_audience_members(session, "rfm_champions", ids[:3])
        assert (result.added, result.member_count) == (3, 3)
        assert add_audience_members(session, "rfm_champions", ids[3:]).member_count == 5
        assert remove_audience_members(session, "rfm_champions", ids[:1]).member_count == 4
    shown = api.get(f"{AUDIENCES}/rfm_champions").json()
    assert (shown["source"], shown["member_count"]) == ("segment", 4)
    with db.reading() as session:
        assert member_audiences(session, ids[1]) == {"rfm_champions"}


def offer_on(api: Api, code: str) -> int:
    body = {
        "name": f"For {code}",
        "chains": [
            {
                "event": "discount_calculation",
                "filters": [{"type": "audience", "audiences": [code]}],
                "actions": [{"type": "discount", "value": "5"}],
            }
        ],
    }
    response = api.post("/api/v1/admin/offers", json=body)
    assert response.status_code == 201, response.text
    offer_id: int = response.json()["id"]
    return offer_id


def test_an_audience_used_by_a_running_offer_cannot_be_deleted(api: Api, db: Database) -> None:
    ids = members(db, 2)
    new_audience(api)
    change(api, "vip", "add", ids)
    offer_id = offer_on(api, "vip")
    for status in ("active", "paused"):
        api.post(f"/api/v1/admin/offers/{offer_id}/status", json={"status": status})
        body = assert_error(api.delete(f"{AUDIENCES}/vip"), 409, "audience_in_use")
        assert body["error"]["details"]["offer_ids"] == [offer_id]
    api.post(f"/api/v1/admin/offers/{offer_id}/status", json={"status": "finished"})
    assert api.delete(f"{AUDIENCES}/vip").status_code == 204
    assert_error(api.get(f"{AUDIENCES}/vip"), 404, "unknown_audience")
    with db.reading() as session:
        assert member_audiences(session, ids[0]) == frozenset()
    audit = api.get("/api/v1/admin/audit", params={"entity": "target_audience", "entity_id": "vip"}).json()
    assert audit["items"][0]["action"] == "delete" and audit["items"][0]["before"]["member_count"] == 2
    # The code is free again.
    assert new_audience(api)["member_count"] == 0


def test_roles_on_audiences(api: Api, db: Database) -> None:
    ids = members(db, 1)
    new_audience(api)
    for role in ("analyst", "operator"):
        reader = api.as_key(make_key(db, role))
        assert_error(reader.post(AUDIENCES, json={"code": "x", "name": "x"}), 403, "forbidden")
        assert_error(change(reader, "vip", "add", ids), 403, "forbidden")
        assert_error(reader.delete(f"{AUDIENCES}/vip"), 403, "forbidden")
        assert reader.get(f"{AUDIENCES}/vip/members").status_code == 200
    marketer = api.as_key(make_key(db, "marketer"))
    assert change(marketer, "vip", "add", ids).json()["member_count"] == 1
