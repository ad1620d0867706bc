"""Small builders shared by the members tests."""

from __future__ import annotations

from typing import Any

from tests.conftest import Api

MEMBERS = "/api/v1/admin/members"
CARDS = "/api/v1/admin/cards"
ATTRIBUTES = "/api/v1/admin/attribute-definitions"


def new_member(api: Api, **fields: Any) -> dict[str, Any]:
    response = api.post(MEMBERS, json=fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def audit(api: Api, entity: str, entity_id: object) -> list[dict[str, Any]]:
    """Audit records of one entity, newest first."""
    response = api.get("/api/v1/admin/audit", params={"entity": entity, "entity_id": str(entity_id)})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items
