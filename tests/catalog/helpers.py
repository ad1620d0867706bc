"""Small builders shared by the catalogue tests."""

from __future__ import annotations

from typing import Any

from tests.conftest import Api

ADMIN = "/api/v1/admin"


def created(response: Any, status: int = 201) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def legal_entity(api: Api, code: str = "LE1", **fields: Any) -> dict[str, Any]:
    return created(
        api.post(f"{ADMIN}/legal-entities", json={"code": code, "name": f"Entity {code}", **fields})
    )


def store(api: Api, code: str, **fields: Any) -> dict[str, Any]:
    body = {"code": code, "name": f"Store {code}", "timezone": "Europe/Moscow", **fields}
    return created(api.post(f"{ADMIN}/stores", json=body))


def product(api: Api, sku: str, **fields: Any) -> dict[str, Any]:
    return created(api.post(f"{ADMIN}/products", json={"sku": sku, "name": f"Product {sku}", **fields}))


def audit(api: Api, entity: str, entity_id: str) -> list[dict[str, Any]]:
    page = api.get(f"{ADMIN}/audit", params={"entity": entity, "entity_id": entity_id})
    items: list[dict[str, Any]] = created(page, 200)["items"]
    return items
