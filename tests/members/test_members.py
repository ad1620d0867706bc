"""Members: registration with normalised contacts, unique identifiers, profile changes, lookup, roles."""

from __future__ import annotations

from datetime import timedelta

import pytest

from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from tests.conftest import Api, assert_error, make_key
from tests.members.helpers import MEMBERS, audit, new_member


def test_registration_normalises_contacts_and_returns_the_member(api: Api) -> None:
    created = new_member(
        api,
        external_id="crm-1",
        first_name="Иван",
        last_name="Петров",
        gender="male",
        birth_date="1990-05-17",
        phone="8 (912) 345-67-89",
        email="  Ivan.Petrov@Example.COM ",
        city="Пермь",
        timezone="Asia/Yekaterinburg",
        children=[{"name": "Маша", "birth_date": "2015-03-01", "gender": "female"}],
        pets=["cat"],
        preferred_categories=["Food / Dairy"],
        consents={"email": True, "sms": {"granted": False, "source": "pos"}},
        cards=[{"number": "2000 0000 0001", "kind": "physical", "state": "activated"}],
    )
    assert created["id"] > 0
    assert created["phone"] == "+79123456789"
    assert created["email"] == "ivan.petrov@example.com"
    assert created["birth_date"] == "1990-05-17"
    assert created["children"] == [{"name": "Маша", "birth_date": "2015-03-01", "gender": "female"}]
    assert created["consents"]["email"]["granted"] is True
    assert created["consents"]["sms"] == {
        "granted": False,
        "source": "pos",
        "changed_at": created["consents"]["sms"]["changed_at"],
    }
    assert created["consents"]["viber"] == {"granted": False, "changed_at": None, "source": None}
    [card] = created["cards"]
    assert (card["number"], card["state"], card["member_id"]) == ("200000000001", "activated", created["id"])
    assert card["activated_at"] is not None
    assert created["registered_at"].endswith(("Z", "+00:00"))
    assert api.get(f"{MEMBERS}/{created['id']}").json() == created


@pytest.mark.parametrize(
    ("field", "first", "second"),
    [
        ("phone", "+7 912 345 67 89", "89123456789"),
        ("email", "a@example.com", "A@EXAMPLE.com"),
        ("external_id", "crm-7", "crm-7"),
    ],
)
def test_each_identifier_is_unique_after_normalisation(api: Api, field: str, first: str, second: str) -> None:
    new_member(api, **{field: first})
    assert_error(api.post(MEMBERS, json={field: second}), 409, "duplicate_identifier", field)
    assert len(api.get(MEMBERS).json()["items"]) == 1


def test_a_card_of_another_member_cannot_be_given_again(api: Api) -> None:
    new_member(api, cards=[{"number": "CARD0001"}])
    response = api.post(MEMBERS, json={"phone": "+79120000001", "cards": [{"number": "card0001"}]})
    assert_error(response, 409, "duplicate_identifier", "cards.0.number")
    response = api.post(MEMBERS, json={"cards": [{"number": "CARD0002"}, {"number": "CARD0002"}]})
    assert_error(response, 409, "duplicate_identifier", "cards.1.number")
    # Nothing was written by the refused requests.
    assert len(api.get(MEMBERS).json()["items"]) == 1
    assert_error(api.get("/api/v1/admin/cards/CARD0002"), 404, "unknown_card")


@pytest.mark.parametrize(
    ("payload", "status", "code", "field"),
    [
        ({"phone": "12"}, 400, "invalid_phone", "phone"),
        ({"phone": "8 (912) 345-67"}, 400, "invalid_phone", "phone"),
        ({"email": "not-an-email"}, 400, "invalid_email", "email"),
        ({"gender": "other"}, 422, "invalid_choice", "gender"),
        ({"timezone": "Mars/Olympus"}, 422, "invalid_timezone", "timezone"),
        ({"birth_date": "1850-01-01"}, 422, "invalid_birth_date", "birth_date"),
        ({"children": [{"birth_date": "2999-01-01"}]}, 422, "invalid_birth_date", "children.0.birth_date"),
        ({"cards": [{"number": "12"}]}, 422, "invalid_card_number", "cards.0.number"),
        ({"cards": [{"number": "1234", "state": "replaced"}]}, 422, "invalid_choice", "cards.0.state"),
        ({"consents": {"fax": True}}, 422, "unknown_field", "consents.fax"),
        ({"nickname": "x"}, 422, "unknown_field", "nickname"),
        ({"registered_at": "2024-01-01T10:00:00"}, 400, "invalid_time", "registered_at"),
    ],
)
def test_bad_member_fields_are_refused(
    api: Api, payload: dict[str, object], status: int, code: str, field: str
) -> None:
    assert_error(api.post(MEMBERS, json=payload), status, code, field)
    assert api.get(MEMBERS).json()["items"] == []


def test_birth_date_in_the_future_is_refused(api: Api) -> None:
    tomorrow_everywhere = (utcnow() + timedelta(days=2)).date().isoformat()
    assert_error(api.post(MEMBERS, json={"birth_date": tomorrow_everywhere}), 422, "invalid_birth_date")
    assert api.post(MEMBERS, json={"birth_date": utcnow().date().isoformat()}).status_code == 201


def test_two_activated_cards_of_one_kind_are_refused_at_registration(api: Api) -> None:
    cards = [{"number": "1111", "state": "activated"}, {"number": "2222", "state": "activated"}]
    assert_error(api.post(MEMBERS, json={"cards": cards}), 409, "card_limit_reached", "cards.1.state")
    cards[1]["kind"] = "virtual"
    created = new_member(api, cards=cards)
    assert sorted(c["kind"] for c in created["cards"]) == ["physical", "virtual"]


def test_patch_changes_only_what_is_sent_and_is_audited(api: Api) -> None:
    member = new_member(api, first_name="Anna", phone="+79120000001", city="Perm")
    other = new_member(api, phone="+79120000002", email="taken@example.com")
    response = api.patch(f"{MEMBERS}/{member['id']}", json={"phone": "8 912 000 00 09", "city": None})
    assert response.status_code == 200, response.text
    patched = response.json()
    assert (patched["phone"], patched["city"], patched["first_name"]) == ("+79120000009", None, "Anna")
    [update, create] = audit(api, "member", member["id"])
    assert (update["action"], create["action"]) == ("update", "create")
    assert update["before"] == {"phone": "+79120000001", "city": "Perm"}
    assert update["after"] == {"phone": "+79120000009", "city": None}
    assert create["after"]["phone"] == "+79120000001"
    # Same validation as on registration; a refused change leaves the member as it was.
    url = f"{MEMBERS}/{member['id']}"
    assert_error(api.patch(url, json={"email": "TAKEN@example.com"}), 409, "duplicate_identifier", "email")
    assert_error(api.patch(url, json={"phone": "+79120000002"}), 409, "duplicate_identifier", "phone")
    assert_error(api.patch(url, json={"phone": "nope"}), 400, "invalid_phone", "phone")
    assert api.get(url).json()["phone"] == "+79120000009"
    # A member keeps its own identifiers; an unchanged PATCH writes no audit record.
    assert api.patch(f"{MEMBERS}/{other['id']}", json={"phone": "+79120000002"}).status_code == 200
    assert len(audit(api, "member", other["id"])) == 1
    assert_error(api.patch(f"{MEMBERS}/999999", json={"city": "X"}), 404, "unknown_member")


def test_list_filters_by_city_and_name_and_pages(api: Api) -> None:
    new_member(api, first_name="Иван", last_name="Смирнов", city="Пермь")
    new_member(api, first_name="Мария", last_name="Иванова", city="Пермь")
    new_member(api, first_name="John", last_name="Smith", city="Omsk")
    assert [m["first_name"] for m in api.get(MEMBERS, params={"city": "Пермь"}).json()["items"]] == [
        "Иван",
        "Мария",
    ]
    found = api.get(MEMBERS, params={"q": "иван"}).json()["items"]
    assert [m["first_name"] for m in found] == ["Иван", "Мария"]
    assert [m["last_name"] for m in api.get(MEMBERS, params={"q": "SMI"}).json()["items"]] == ["Smith"]
    first = api.get(MEMBERS, params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["next_cursor"]
    rest = api.get(MEMBERS, params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [m["first_name"] for m in rest["items"]] == ["John"] and rest["next_cursor"] is None
    assert_error(api.get(MEMBERS, params={"limit": 501}), 400, "invalid_limit", "limit")


def test_lookup_normalises_the_identifier(api: Api) -> None:
    member = new_member(
        api, phone="+79123456789", email="x@example.com", external_id="E1", cards=[{"number": "ABCD1234"}]
    )
    for params in (
        {"phone": "8 (912) 345-67-89"},
        {"email": " X@Example.com"},
        {"external_id": "E1"},
        {"card": "abcd-1234"},
    ):
        response = api.get(f"{MEMBERS}/lookup", params=params)
        assert response.status_code == 200, (params, response.text)
        assert response.json()["id"] == member["id"]
    assert_error(api.get(f"{MEMBERS}/lookup", params={"phone": "+79990000000"}), 404, "unknown_member")
    assert_error(api.get(f"{MEMBERS}/lookup", params={"card": "ZZZZ9999"}), 404, "unknown_member")
    assert_error(api.get(f"{MEMBERS}/lookup"), 400, "identifier_required")
    both = {"phone": "+79123456789", "email": "x@example.com"}
    assert_error(api.get(f"{MEMBERS}/lookup", params=both), 400, "too_many_identifiers")
    assert_error(api.get(f"{MEMBERS}/lookup", params={"phone": "abc"}), 400, "invalid_phone", "phone")


def test_roles_and_the_client_scope(api: Api, db: Database) -> None:
    me = new_member(api, first_name="Me")
    other = new_member(api, first_name="Other")
    client = api.as_key(make_key(db, "client", member_id=me["id"]))
    assert client.get(f"{MEMBERS}/{me['id']}").json()["first_name"] == "Me"
    assert client.get(f"{MEMBERS}/{me['id']}/consents").status_code == 200
    assert_error(client.get(f"{MEMBERS}/{other['id']}"), 403, "forbidden")
    assert_error(client.get(f"{MEMBERS}/{other['id']}/consents"), 403, "forbidden")
    assert_error(client.get(MEMBERS), 403, "forbidden")
    assert_error(client.patch(f"{MEMBERS}/{me['id']}", json={"first_name": "X"}), 403, "forbidden")
    for role in ("marketer", "analyst"):
        reader = api.as_key(make_key(db, role))
        assert reader.get(f"{MEMBERS}/{other['id']}").status_code == 200
        assert reader.get(MEMBERS).status_code == 200
        assert_error(reader.post(MEMBERS, json={}), 403, "forbidden")
        assert_error(reader.patch(f"{MEMBERS}/{me['id']}", json={"city": "X"}), 403, "forbidden")
        assert_error(reader.post("/api/v1/admin/cards", json={"numbers": ["1234"]}), 403, "forbidden")
    operator = api.as_key(make_key(db, "operator", name="call centre"))
    created = operator.post(MEMBERS, json={"first_name": "By phone"})
    assert created.status_code == 201
    assert audit(api, "member", created.json()["id"])[0]["actor"] == "operator:call centre"


def test_contact_facts_of_many_members(api: Api, db: Database) -> None:
    """Status, contacts and cards of a batch of members in two statements (the warehouse mirror)."""
    from omniloyal.members import service

    first = new_member(api, phone="+79161234567", cards=[{"number": "2000000000017"}])
    second = new_member(api, email="a@example.com")
    facts = service.contact_facts(db, [first["id"], second["id"], 424242])
    assert set(facts) == {first["id"], second["id"]}
    assert facts[first["id"]].phone == "+79161234567" and facts[first["id"]].status == first["status"]
    assert [c[0] for c in facts[first["id"]].cards] == [c["number"] for c in first["cards"]] != []
    assert facts[second["id"]].email == "a@example.com" and facts[second["id"]].cards == ()
