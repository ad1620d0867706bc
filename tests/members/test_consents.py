"""Consents per channel: given, withdrawn, unchanged; always four channels; audited."""

from __future__ import annotations

from omniloyal.db.engine import Database
from tests.conftest import Api, assert_error, make_key
from tests.members.helpers import MEMBERS, audit, new_member


def test_missing_channels_read_as_not_granted(api: Api) -> None:
    member = new_member(api)
    consents = api.get(f"{MEMBERS}/{member['id']}/consents").json()
    assert consents == {
        c: {"granted": False, "changed_at": None, "source": None} for c in ("email", "sms", "viber", "push")
    }


def test_put_changes_the_channels_given_and_is_audited(api: Api) -> None:
    member = new_member(api, consents={"sms": {"granted": True, "source": "pos"}, "email": True})
    url = f"{MEMBERS}/{member['id']}/consents"
    given_at = member["consents"]["sms"]["changed_at"]
    assert member["consents"]["email"]["source"] == "admin_api"
    response = api.put(url, json={"sms": {"granted": False, "source": "contact_center"}, "push": True})
    assert response.status_code == 200, response.text
    consents = response.json()
    assert consents["sms"]["granted"] is False and consents["sms"]["source"] == "contact_center"
    assert consents["sms"]["changed_at"] >= given_at
    assert consents["push"]["granted"] is True
    assert consents["email"]["granted"] is True  # not sent: unchanged
    assert api.get(url).json() == consents
    assert api.get(f"{MEMBERS}/{member['id']}").json()["consents"] == consents
    [record, _create] = audit(api, "member", member["id"])
    assert record["action"] == "consents"
    assert record["before"] == {
        "sms": {"granted": True, "changed_at": given_at, "source": "pos"},
        "push": None,
    }
    assert record["after"]["sms"]["granted"] is False and record["after"]["push"]["granted"] is True
    # Repeating the same answer changes nothing and writes no audit record.
    assert api.put(url, json={"sms": False}).json()["sms"] == consents["sms"]
    assert len(audit(api, "member", member["id"])) == 2


def test_bad_consents_are_refused(api: Api, db: Database) -> None:
    member = new_member(api)
    url = f"{MEMBERS}/{member['id']}/consents"
    assert_error(api.put(url, json={"fax": True}), 422, "unknown_field", "fax")
    assert_error(api.put(url, json={"sms": "yes"}), 422, "bool_type")
    assert_error(api.put(f"{MEMBERS}/999999/consents", json={"sms": True}), 404, "unknown_member")
    analyst = api.as_key(make_key(db, "analyst"))
    assert_error(analyst.put(url, json={"sms": True}), 403, "forbidden")
    assert api.get(url).json()["sms"]["granted"] is False
