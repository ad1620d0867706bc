"""API keys: roles, scopes, hashing, revocation; uniform errors."""

from __future__ import annotations

from sqlalchemy import select

from omniloyal.auth.models import ApiKey
from omniloyal.auth.service import hash_key
from omniloyal.db.engine import Database
from tests.conftest import Api, assert_error, make_key


def test_health_is_open(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/health").json()["status"] == "ok"


def test_requests_without_a_key_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    assert_error(client.get("/api/v1/admin/keys"), 401, "missing_api_key")
    response = client.get("/api/v1/admin/keys", headers={"Authorization": "Bearer olk_nope"})
    assert_error(response, 401, "invalid_api_key")


def test_keys_are_stored_hashed(api: Api, db: Database) -> None:
    created = api.post("/api/v1/admin/keys", json={"role": "analyst", "name": "reports"})
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    with db.reading() as session:
        stored = session.scalar(select(ApiKey).where(ApiKey.id == created.json()["id"]))
        assert stored is not None
        assert stored.key_hash == hash_key(secret)
        assert secret not in (stored.key_hash, stored.prefix)
    listed = api.get("/api/v1/admin/keys").json()["items"]
    assert all("key" not in item for item in listed)


def test_role_is_checked(api: Api, db: Database) -> None:
    analyst = api.as_key(make_key(db, "analyst"))
    assert_error(analyst.post("/api/v1/admin/keys", json={"role": "admin"}), 403, "forbidden")
    assert analyst.get("/api/v1/admin/audit").status_code == 200


def test_pos_key_needs_a_known_store(api: Api) -> None:
    assert_error(api.post("/api/v1/admin/keys", json={"role": "pos"}), 400, "store_required", "store")
    assert_error(api.post("/api/v1/admin/keys", json={"role": "pos", "store": "nope"}), 404, "unknown_store")


def test_bad_role_is_a_validation_error(api: Api) -> None:
    assert_error(api.post("/api/v1/admin/keys", json={"role": "king"}), 422, "invalid_choice", "role")


def test_revoked_key_stops_working(api: Api, db: Database) -> None:
    created = api.post("/api/v1/admin/keys", json={"role": "admin", "name": "temp"}).json()
    temp = api.as_key(created["key"])
    assert temp.get("/api/v1/admin/keys").status_code == 200
    assert api.post(f"/api/v1/admin/keys/{created['id']}/revoke").status_code == 200
    assert_error(temp.get("/api/v1/admin/keys"), 401, "invalid_api_key")
    audit = api.get("/api/v1/admin/audit", params={"entity": "api_key"}).json()["items"]
    assert [a["action"] for a in audit][:2] == ["revoke", "create"]


def test_pagination_walks_every_key(api: Api, db: Database) -> None:
    for i in range(7):
        make_key(db, "analyst", name=f"k{i}")
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/v1/admin/keys", params=params).json()
        seen += [k["id"] for k in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 8
    assert_error(
        api.get("/api/v1/admin/keys", params={"cursor": "garbage!"}), 400, "invalid_cursor", "cursor"
    )
    assert_error(api.get("/api/v1/admin/keys", params={"limit": 0}), 400, "invalid_limit", "limit")
