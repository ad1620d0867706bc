"""Custom attribute definitions and the validation of member attribute values."""

from __future__ import annotations

from typing import Any

import pytest

from omniloyal.db.engine import Database
from tests.conftest import Api, assert_error, make_key
from tests.members.helpers import ATTRIBUTES, MEMBERS, audit, new_member


def define(api: Api, **fields: Any) -> dict[str, Any]:
    response = api.post(ATTRIBUTES, json={"name": fields.get("code", "x"), **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def definitions(api: Api) -> None:
    define(api, code="nickname", type="string", constraints={"max_length": 5, "pattern": "[a-z]+"})
    define(api, code="kids", type="integer", constraints={"min": "0", "max": "10"})
    define(api, code="income", type="decimal", constraints={"min": "0", "max": "1000000.50"})
    define(api, code="vip", type="boolean")
    define(api, code="wedding", type="date")
    define(api, code="last_call", type="datetime")
    define(api, code="shop_format", type="enum", choices=["hyper", "super"])


@pytest.mark.usefixtures("definitions")
def test_valid_values_of_each_type_are_stored(api: Api) -> None:
    attributes = {
        "nickname": "ivan",
        "kids": 2,
        "income": "1500.5",
        "vip": True,
        "wedding": "2015-06-20",
        "last_call": "2026-01-31T10:00:00+03:00",
        "shop_format": "hyper",
    }
    member = new_member(api, attributes=attributes)
    assert member["attributes"] == {
        **attributes,
        "income": "1500.5",
        "last_call": "2026-01-31T07:00:00+00:00",
    }


@pytest.mark.usefixtures("definitions")
@pytest.mark.parametrize(
    ("code", "value"),
    [
        ("nickname", 5),
        ("nickname", "toolong"),
        ("nickname", "IVAN"),
        ("kids", "2"),
        ("kids", 2.0),
        ("kids", True),
        ("kids", 11),
        ("kids", -1),
        ("income", 1500.5),
        ("income", "lots"),
        ("income", "1000000.51"),
        ("vip", "yes"),
        ("wedding", "20/06/2015"),
        ("last_call", "2026-01-31T10:00:00"),
        ("last_call", "yesterday"),
        ("shop_format", "mini"),
    ],
)
def test_invalid_values_are_refused_with_the_attribute_as_field(api: Api, code: str, value: Any) -> None:
    response = api.post(MEMBERS, json={"attributes": {code: value}})
    assert_error(response, 400, "invalid_attribute", f"attributes.{code}")


def test_unknown_and_required_attributes(api: Api) -> None:
    assert_error(
        api.post(MEMBERS, json={"attributes": {"shoe": 42}}), 400, "unknown_attribute", "attributes.shoe"
    )
    member = new_member(api)  # defined later: existing members are not invalidated
    define(api, code="segment", type="string", required=True)
    assert_error(api.post(MEMBERS, json={}), 400, "missing_attribute", "attributes.segment")
    assert_error(
        api.post(MEMBERS, json={"attributes": {"segment": None}}),
        400,
        "missing_attribute",
        "attributes.segment",
    )
    assert api.patch(f"{MEMBERS}/{member['id']}", json={"city": "Perm"}).status_code == 200
    other = new_member(api, attributes={"segment": "gold"})
    url = f"{MEMBERS}/{other['id']}"
    assert_error(api.patch(url, json={"attributes": {"segment": None}}), 400, "missing_attribute")


def test_patch_merges_attributes_and_null_removes_one(api: Api) -> None:
    define(api, code="a", type="string")
    define(api, code="b", type="integer")
    member = new_member(api, attributes={"a": "x", "b": 1})
    url = f"{MEMBERS}/{member['id']}"
    assert api.patch(url, json={"attributes": {"b": 2}}).json()["attributes"] == {"a": "x", "b": 2}
    assert api.patch(url, json={"attributes": {"a": None}}).json()["attributes"] == {"b": 2}
    assert_error(api.patch(url, json={"attributes": {"b": "3"}}), 400, "invalid_attribute", "attributes.b")
    assert api.get(url).json()["attributes"] == {"b": 2}


@pytest.mark.parametrize(
    ("payload", "status", "code", "field"),
    [
        ({"code": "Bad Code", "type": "string"}, 422, "invalid_code", "code"),
        ({"code": "x", "type": "money"}, 422, "invalid_choice", "type"),
        ({"code": "x", "type": "enum"}, 400, "choices_required", "choices"),
        ({"code": "x", "type": "enum", "choices": ["a", "a"]}, 400, "duplicate_choice", "choices"),
        ({"code": "x", "type": "string", "choices": ["a"]}, 400, "choices_not_allowed", "choices"),
        (
            {"code": "x", "type": "string", "constraints": {"min": "1"}},
            400,
            "invalid_constraints",
            "constraints.min",
        ),
        (
            {"code": "x", "type": "integer", "constraints": {"max": "1.5"}},
            400,
            "invalid_constraints",
            "constraints.max",
        ),
        (
            {"code": "x", "type": "decimal", "constraints": {"min": "5", "max": "1"}},
            400,
            "invalid_constraints",
            "constraints.max",
        ),
        (
            {"code": "x", "type": "string", "constraints": {"pattern": "("}},
            400,
            "invalid_pattern",
            "constraints.pattern",
        ),
        (
            {"code": "x", "type": "decimal", "constraints": {"min": 0.5}},
            422,
            "invalid_value",
            "constraints.min",
        ),
    ],
)
def test_bad_definitions_are_refused(
    api: Api, payload: dict[str, Any], status: int, code: str, field: str
) -> None:
    assert_error(api.post(ATTRIBUTES, json={"name": "X", **payload}), status, code, field)
    assert api.get(ATTRIBUTES).json()["items"] == []


def test_definitions_are_listed_read_updated_and_audited(api: Api, db: Database) -> None:
    define(api, code="tier", type="enum", choices=["silver", "gold"])
    assert_error(
        api.post(ATTRIBUTES, json={"code": "tier", "name": "Tier", "type": "string"}),
        409,
        "duplicate_code",
        "code",
    )
    updated = api.patch(
        f"{ATTRIBUTES}/tier", json={"name": "Tier", "choices": ["silver", "gold", "platinum"]}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["choices"] == ["silver", "gold", "platinum"]
    assert new_member(api, attributes={"tier": "platinum"})["attributes"] == {"tier": "platinum"}
    assert_error(api.patch(f"{ATTRIBUTES}/tier", json={"choices": None}), 400, "choices_required", "choices")
    assert_error(api.patch(f"{ATTRIBUTES}/nope", json={"name": "N"}), 404, "unknown_attribute")
    define(api, code="score", type="integer")
    reader = api.as_key(make_key(db, "marketer"))
    assert [d["code"] for d in reader.get(ATTRIBUTES).json()["items"]] == ["tier", "score"]
    assert reader.get(f"{ATTRIBUTES}/score").json()["type"] == "integer"
    assert_error(reader.patch(f"{ATTRIBUTES}/score", json={"name": "S"}), 403, "forbidden")
    [update, create] = audit(api, "attribute_definition", "tier")
    assert update["before"]["choices"] == ["silver", "gold"]
    assert update["after"]["choices"] == ["silver", "gold", "platinum"]
    assert create["action"] == "create"
