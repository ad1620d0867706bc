"""Cards: batches of prepared cards, linking, issue, activation limits, blocking, replacement."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.members import service
from omniloyal.members.models import Card
from tests.conftest import Api, assert_error, make_key
from tests.members.helpers import CARDS, MEMBERS, audit, new_member


def card(api: Api, number: str) -> dict[str, Any]:
    response = api.get(f"{CARDS}/{number}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def act(api: Api, number: str, action: str, **body: Any) -> Any:
    return api.post(f"{CARDS}/{number}/{action}", json=body or None)


def active_member(api: Api, number: str = "1000", kind: str = "physical") -> dict[str, Any]:
    return new_member(api, cards=[{"number": number, "kind": kind, "state": "activated"}])


def test_batch_creates_unassigned_prepared_cards(api: Api) -> None:
    response = api.post(CARDS, json={"numbers": ["0001", "ab-0002"], "kind": "virtual"})
    assert response.status_code == 201, response.text
    assert [(c["number"], c["state"], c["kind"], c["member_id"]) for c in response.json()] == [
        ("0001", "prepared", "virtual", None),
        ("AB0002", "prepared", "virtual", None),
    ]
    assert_error(
        api.post(CARDS, json={"numbers": ["0003", "0001"]}), 409, "duplicate_identifier", "numbers.1"
    )
    assert_error(
        api.post(CARDS, json={"numbers": ["0004", "0004"]}), 409, "duplicate_identifier", "numbers.1"
    )
    assert_error(api.post(CARDS, json={"numbers": ["00!5"]}), 422, "invalid_card_number", "numbers.0")
    assert_error(api.get(f"{CARDS}/0003"), 404, "unknown_card")
    assert audit(api, "card", "AB0002")[0]["action"] == "create"


def test_every_forward_transition_and_its_refusals(api: Api) -> None:
    api.post(CARDS, json={"numbers": ["5000"]})
    member = new_member(api)
    assert_error(act(api, "5000", "activate"), 409, "card_unassigned")
    assert_error(act(api, "5000", "block", reason="lost"), 409, "card_not_active")
    issued = act(api, "5000", "issue")
    assert issued.status_code == 200 and issued.json()["state"] == "issued" and issued.json()["issued_at"]
    assert_error(act(api, "5000", "issue"), 409, "invalid_card_state")
    linked = api.post(f"{MEMBERS}/{member['id']}/cards", json={"number": "5000"})
    assert linked.status_code == 201, linked.text
    assert (linked.json()["member_id"], linked.json()["state"]) == (member["id"], "issued")
    activated = act(api, "5000", "activate").json()
    assert activated["state"] == "activated" and activated["activated_at"]
    assert_error(act(api, "5000", "activate"), 409, "invalid_card_state")
    assert_error(act(api, "5000", "issue"), 409, "invalid_card_state")
    assert_error(act(api, "5000", "unblock"), 409, "card_not_blocked")
    assert_error(act(api, "5000", "block", reason="other"), 422, "comment_required")
    assert_error(act(api, "5000", "block", reason="stolen"), 422, "invalid_choice", "reason")
    blocked = act(api, "5000", "block", reason="other", comment="chewed by a dog").json()
    assert (blocked["blocked"], blocked["block_reason"], blocked["block_comment"]) == (
        True,
        "other",
        "chewed by a dog",
    )
    assert_error(act(api, "5000", "block", reason="lost"), 409, "card_blocked")
    unblocked = act(api, "5000", "unblock").json()
    assert (unblocked["blocked"], unblocked["block_reason"], unblocked["blocked_at"]) == (False, None, None)
    actions = [a["action"] for a in audit(api, "card", "5000")]
    assert actions == ["unblock", "block", "activate", "link", "issue", "create"]
    [block_record] = [a for a in audit(api, "card", "5000") if a["action"] == "block"]
    assert block_record["before"]["blocked"] is False and block_record["after"]["blocked"] is True


def test_linking_creates_unknown_cards_and_refuses_taken_ones(api: Api) -> None:
    member = new_member(api)
    other = new_member(api, cards=[{"number": "7777"}])
    url = f"{MEMBERS}/{member['id']}/cards"
    created = api.post(url, json={"number": "8888", "kind": "virtual", "state": "activated"}).json()
    assert (created["kind"], created["state"], created["member_id"]) == ("virtual", "activated", member["id"])
    assert api.post(url, json={"number": "8889"}).json()["kind"] == "physical"
    assert_error(api.post(url, json={"number": "7777"}), 409, "duplicate_identifier", "number")
    assert_error(api.post(url, json={"number": "8888"}), 409, "duplicate_identifier", "number")
    api.post(CARDS, json={"numbers": ["9999"], "kind": "virtual"})
    assert_error(
        api.post(url, json={"number": "9999", "kind": "physical"}), 409, "card_kind_mismatch", "kind"
    )
    assert card(api, "9999")["member_id"] is None
    assert_error(api.post(f"{MEMBERS}/999999/cards", json={"number": "9998"}), 404, "unknown_member")
    assert [c["number"] for c in api.get(f"{MEMBERS}/{other['id']}").json()["cards"]] == ["7777"]


def test_one_activated_card_of_each_kind_per_member(api: Api, db: Database) -> None:
    member = active_member(api, "1000")
    url = f"{MEMBERS}/{member['id']}/cards"
    assert api.post(url, json={"number": "1001"}).status_code == 201
    assert_error(act(api, "1001", "activate"), 409, "card_limit_reached")
    assert_error(
        api.post(url, json={"number": "1002", "state": "activated"}), 409, "card_limit_reached", "state"
    )
    assert api.post(url, json={"number": "2000", "kind": "virtual", "state": "activated"}).status_code == 201
    assert card(api, "1001")["state"] == "prepared"
    # A blocked card still counts: the way out is a replacement.
    act(api, "1000", "block", reason="lost")
    assert_error(act(api, "1001", "activate"), 409, "card_limit_reached")
    # The store enforces the rule too, whatever the code above does.
    with pytest.raises(IntegrityError), db.transaction() as session:
        session.execute(update(Card).where(Card.number == "1001").values(state="activated"))


def test_replacement_keeps_the_member_and_activates_the_new_card(api: Api) -> None:
    member = active_member(api, "1000")
    assert_error(act(api, "1000", "replace", new_number="1500"), 409, "card_not_blocked")
    act(api, "1000", "block", reason="lost")
    response = act(api, "1000", "replace", new_number="1500")
    assert response.status_code == 200, response.text
    old, new = response.json()["old_card"], response.json()["new_card"]
    assert (old["state"], old["replaced_by"], old["blocked"]) == ("replaced", "1500", True)
    assert (new["state"], new["member_id"], new["kind"], new["blocked"]) == (
        "activated",
        member["id"],
        "physical",
        False,
    )
    assert [c["number"] for c in api.get(f"{MEMBERS}/{member['id']}").json()["cards"]] == ["1000", "1500"]
    lookup = api.get(f"{MEMBERS}/lookup", params={"card": "1500"})
    assert lookup.json()["id"] == member["id"]
    assert_error(act(api, "1000", "replace", new_number="1600"), 409, "invalid_card_state")
    assert_error(act(api, "1000", "unblock"), 409, "invalid_card_state")
    assert_error(act(api, "1000", "activate"), 409, "invalid_card_state")
    assert audit(api, "card", "1000")[0]["action"] == "replace"
    assert audit(api, "card", "1500")[0]["action"] == "replacement"


def test_replacement_uses_a_prepared_card_and_refuses_the_wrong_ones(api: Api) -> None:
    member = active_member(api, "1000")
    act(api, "1000", "block", reason="damaged")
    new_member(api, cards=[{"number": "3000"}])
    api.post(CARDS, json={"numbers": ["4000"]})
    api.post(CARDS, json={"numbers": ["4001"]})
    act(api, "4001", "issue")
    api.post(CARDS, json={"numbers": ["4002"], "kind": "virtual"})
    assert_error(act(api, "1000", "replace", new_number="3000"), 409, "card_not_available", "new_number")
    assert_error(act(api, "1000", "replace", new_number="4001"), 409, "card_not_available", "new_number")
    assert_error(act(api, "1000", "replace", new_number="4002"), 409, "card_kind_mismatch", "new_number")
    assert_error(act(api, "1000", "replace", new_number="1000"), 400, "same_card", "new_number")
    assert_error(act(api, "1000", "replace", new_number="x"), 422, "invalid_card_number", "new_number")
    assert card(api, "1000")["state"] == "activated"
    assert act(api, "1000", "replace", new_number="4000").json()["new_card"]["member_id"] == member["id"]
    assert card(api, "4000")["state"] == "activated"


def test_virtual_cards_are_not_replaced(api: Api) -> None:
    active_member(api, "2000", kind="virtual")
    act(api, "2000", "block", reason="other", comment="leaked")
    assert_error(act(api, "2000", "replace", new_number="2001"), 409, "virtual_card_not_replaceable")
    assert card(api, "2000")["state"] == "activated"
    assert_error(api.get(f"{CARDS}/2001"), 404, "unknown_card")


def test_card_roles(api: Api, db: Database) -> None:
    active_member(api, "1000")
    operator = api.as_key(make_key(db, "operator"))
    assert operator.post(f"{CARDS}/1000/block", json={"reason": "lost"}).status_code == 200
    for role in ("marketer", "analyst"):
        reader = api.as_key(make_key(db, role))
        assert reader.get(f"{CARDS}/1000").json()["blocked"] is True
        assert_error(reader.post(f"{CARDS}/1000/unblock"), 403, "forbidden")


def test_service_functions_for_the_till(api: Api, db: Database) -> None:
    member = new_member(
        api,
        phone="+79123456789",
        email="a@example.com",
        external_id="E1",
        cards=[{"number": "1000", "state": "activated"}],
    )
    api.post(CARDS, json={"numbers": ["1999"]})
    with db.reading() as session:
        assert service.find_member_id(session, card="1000") == member["id"]
        assert service.find_member_id(session, phone="8 912 345-67-89") == member["id"]
        assert service.find_member_id(session, email="A@example.com") == member["id"]
        assert service.find_member_id(session, external_id="E1") == member["id"]
        assert service.find_member_id(session, card="1999") is None
        assert service.find_member_id(session, phone="+79990000000") is None
        assert service.card_for_processing(session, "1000").member_id == member["id"]
        with pytest.raises(AppError) as unknown:
            service.card_for_processing(session, "0000")
        assert (unknown.value.code, unknown.value.status_code) == ("unknown_card", 404)
    act(api, "1000", "block", reason="lost")
    with db.reading() as session, pytest.raises(AppError) as blocked:
        service.card_for_processing(session, "1000")
    assert (blocked.value.code, blocked.value.status_code) == ("card_blocked", 409)


def test_races_past_the_checks_still_get_specific_errors(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a concurrent writer sees on PostgreSQL: the pre-check passed, the constraint refuses.
    member = active_member(api, "1000")
    new_member(api, phone="+79120000001")
    monkeypatch.setattr(service, "_check_card_limit", lambda *_: None)
    monkeypatch.setattr(service, "_check_identifiers_free", lambda *_: None)
    url = f"{MEMBERS}/{member['id']}/cards"
    assert_error(api.post(url, json={"number": "1001", "state": "activated"}), 409, "card_limit_reached")
    assert_error(api.post(MEMBERS, json={"phone": "89120000001"}), 409, "duplicate_identifier", "phone")
    assert_error(api.get(f"{CARDS}/1001"), 404, "unknown_card")
    assert len(api.get(MEMBERS).json()["items"]) == 2
