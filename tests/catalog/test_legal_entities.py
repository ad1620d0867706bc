"""Legal entities: exactly one default, audited changes; payment methods."""

from __future__ import annotations

from omniloyal.catalog.service import default_legal_entity_id, legal_entity_id_by_code
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import NotFound
from tests.catalog.helpers import ADMIN, audit, created, legal_entity
from tests.conftest import Api, assert_error, make_key


def _defaults(api: Api) -> list[str]:
    items = created(api.get(f"{ADMIN}/legal-entities"), 200)["items"]
    return [e["code"] for e in items if e["is_default"]]


def test_first_entity_is_default_and_default_moves(api: Api, db: Database) -> None:
    first = legal_entity(api, "NORTH", tax_id="7701234567")
    assert first["is_default"] is True and first["tax_id"] == "7701234567"
    second = legal_entity(api, "SOUTH")
    assert second["is_default"] is False
    assert _defaults(api) == ["NORTH"]

    legal_entity(api, "EAST", is_default=True)
    assert _defaults(api) == ["EAST"]
    moved = api.patch(f"{ADMIN}/legal-entities/SOUTH", json={"is_default": True, "name": "South LLC"})
    assert created(moved, 200)["is_default"] is True and moved.json()["name"] == "South LLC"
    assert _defaults(api) == ["SOUTH"]
    with db.reading() as session:
        assert default_legal_entity_id(session) == second["id"]
        assert legal_entity_id_by_code(session, "NORTH") == first["id"]
        try:
            legal_entity_id_by_code(session, "NOPE")
            raise AssertionError("expected unknown_legal_entity")
        except NotFound as exc:
            assert exc.code == "unknown_legal_entity"


def test_default_cannot_be_unset_only_moved(api: Api) -> None:
    legal_entity(api, "ONLY")
    response = api.patch(f"{ADMIN}/legal-entities/ONLY", json={"is_default": False})
    assert_error(response, 409, "default_required", "is_default")
    assert _defaults(api) == ["ONLY"]


def test_refusals(api: Api) -> None:
    legal_entity(api, "LE1")
    assert_error(
        api.post(f"{ADMIN}/legal-entities", json={"code": "LE1", "name": "x"}), 409, "duplicate_code", "code"
    )
    assert_error(
        api.post(f"{ADMIN}/legal-entities", json={"code": "a b", "name": "x"}), 422, "invalid_code", "code"
    )
    assert_error(api.post(f"{ADMIN}/legal-entities", json={"code": "LE2"}), 422, "missing_field", "name")
    assert_error(
        api.patch(f"{ADMIN}/legal-entities/LE1", json={"name": None}), 422, "null_not_allowed", "name"
    )
    assert_error(api.get(f"{ADMIN}/legal-entities/NOPE"), 404, "unknown_legal_entity")
    assert_error(api.patch(f"{ADMIN}/legal-entities/NOPE", json={"name": "x"}), 404, "unknown_legal_entity")


def test_changes_are_audited(api: Api) -> None:
    legal_entity(api, "A")
    legal_entity(api, "B", is_default=True)
    api.patch(f"{ADMIN}/legal-entities/A", json={"tax_id": "123"})
    api.patch(f"{ADMIN}/legal-entities/A", json={"tax_id": "123"})  # no change, no record
    records = audit(api, "legal_entity", "A")
    assert [r["action"] for r in records] == ["update", "update", "create"]
    assert records[0]["before"] == {"tax_id": None} and records[0]["after"] == {"tax_id": "123"}
    assert records[1]["after"] == {"is_default": False}
    assert records[2]["after"]["is_default"] is True


def test_only_admin_writes_but_others_read(api: Api, db: Database) -> None:
    legal_entity(api, "LE1")
    for role in ("marketer", "operator", "analyst"):
        other = api.as_key(make_key(db, role))
        assert other.get(f"{ADMIN}/legal-entities/LE1").status_code == 200
        assert_error(other.post(f"{ADMIN}/legal-entities", json={"code": "X", "name": "x"}), 403, "forbidden")
        assert_error(other.patch(f"{ADMIN}/legal-entities/LE1", json={"name": "x"}), 403, "forbidden")


def test_payment_methods(api: Api, db: Database) -> None:
    card = created(api.post(f"{ADMIN}/payment-methods", json={"code": "card", "name": "Bank card"}))
    assert card["code"] == "card" and card["name"] == "Bank card"
    api.post(f"{ADMIN}/payment-methods", json={"code": "cash", "name": "Cash"})
    assert [m["code"] for m in api.get(f"{ADMIN}/payment-methods").json()["items"]] == ["card", "cash"]
    assert api.get(f"{ADMIN}/payment-methods/cash").json()["name"] == "Cash"
    response = api.post(f"{ADMIN}/payment-methods", json={"code": "card", "name": "Again"})
    assert_error(response, 409, "duplicate_code", "code")
    assert_error(api.get(f"{ADMIN}/payment-methods/nope"), 404, "unknown_payment_method")
    assert_error(api.post(f"{ADMIN}/payment-methods", json={"code": "gift"}), 422, "missing_field", "name")
    marketer = api.as_key(make_key(db, "marketer"))
    assert_error(
        marketer.post(f"{ADMIN}/payment-methods", json={"code": "qr", "name": "QR"}), 403, "forbidden"
    )
    assert audit(api, "payment_method", "card")[0]["action"] == "create"
