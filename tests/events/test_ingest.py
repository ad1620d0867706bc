"""Member events through POST /api/v1/events: offers on arrival, per-event errors, repeats harmless."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import select

from omniloyal.db.engine import Database
from omniloyal.events.models import OutboxEvent
from omniloyal.events.service import run_birthdays
from omniloyal.offers.models import Offer
from tests.conftest import Api, assert_error

ADMIN = "/api/v1/admin"


def _setup(api: Api, db: Database) -> int:
    assert api.post(f"{ADMIN}/legal-entities", json={"code": "LE", "name": "Retail"}).status_code == 201
    member = api.post(
        f"{ADMIN}/members",
        json={
            "first_name": "Ivan",
            "phone": "+79001234567",
            "birth_date": "1990-05-17",
            "cards": [{"number": "5550", "kind": "virtual", "state": "activated"}],
        },
    )
    assert member.status_code == 201, member.text
    with db.transaction() as session:
        session.add(
            Offer(
                name="App install",
                status="active",
                chains=[
                    {
                        "event": "mobile_app_installed",
                        "filters": [],
                        "actions": [
                            {"type": "extra_bonus", "value": "100", "currency": "bonus", "lifetime_days": 90}
                        ],
                    }
                ],
            )
        )
        session.add(
            Offer(
                name="Birthday",
                status="active",
                chains=[
                    {"event": "birthday", "filters": [], "actions": [{"type": "extra_bonus", "value": "300"}]}
                ],
            )
        )
    member_id: int = member.json()["id"]
    return member_id


def _available(api: Api, member_id: int) -> str:
    balances: list[dict[str, Any]] = api.get(f"{ADMIN}/members/{member_id}/balance").json()["balances"]
    return next((b["available"] for b in balances if b["currency"] == "bonus"), "0")


def test_app_installation_earns_points_once(api: Api, db: Database) -> None:
    member_id = _setup(api, db)
    event = {
        "id": "ev-1",
        "type": "mobile_app_installed",
        "occurred_at": "2026-11-23T10:00:00+03:00",
        "member": {"phone": "8 900 123-45-67"},
        "properties": {"platform": "android"},
    }
    answer = api.post("/api/v1/events", json=[event]).json()
    assert answer["accepted"] == 1 and answer["results"][0]["accrued"] == {"bonus": "100.00"}
    again = api.post("/api/v1/events", json={"events": [event]}).json()
    assert again["duplicates"] == 1
    assert _available(api, member_id) == "100.00"


def test_bad_events_are_rejected_with_their_index_and_good_ones_kept(api: Api, db: Database) -> None:
    member_id = _setup(api, db)
    batch = [
        {
            "id": "ok",
            "type": "mobile_app_installed",
            "occurred_at": "2026-11-23T10:00:00Z",
            "member": {"card": "5550"},
        },
        {"id": "no-time", "type": "mobile_app_installed", "member": {"card": "5550"}},
        {
            "id": "stranger",
            "type": "card_activated",
            "occurred_at": "2026-11-23T10:00:00Z",
            "member": {"phone": "+79990000000"},
        },
        {
            "id": "odd",
            "type": "teleported",
            "occurred_at": "2026-11-23T10:00:00Z",
            "member": {"id": member_id},
        },
    ]
    answer = api.post("/api/v1/events", json=batch).json()
    assert (answer["accepted"], answer["rejected"]) == (1, 3)
    codes = {r["index"]: r["error"]["code"] for r in answer["results"] if r["error"]}
    assert codes == {1: "missing_field", 2: "unknown_member", 3: "unknown_event_type"}
    assert_error(api.post("/api/v1/events", json={"nope": 1}), 400, "invalid_batch")


def test_birthday_job_runs_once_per_day(api: Api, db: Database) -> None:
    member_id = _setup(api, db)
    assert run_birthdays(db, date(2026, 5, 17)) == 1
    assert run_birthdays(db, date(2026, 5, 17)) == 0
    assert run_birthdays(db, date(2026, 5, 18)) == 0
    assert _available(api, member_id) == "300.00"


def test_member_events_and_birthdays_are_written_to_the_outbox(api: Api, db: Database) -> None:
    member_id = _setup(api, db)
    event = {
        "id": "ev-out",
        "type": "mobile_app_installed",
        "occurred_at": "2026-11-23T10:00:00+03:00",
        "member": {"card": "5550"},
        "source": "mobile_app",
        "properties": {"platform": "ios"},
    }
    assert api.post("/api/v1/events", json=[event]).json()["accepted"] == 1
    assert run_birthdays(db, date(2026, 5, 17)) == 1
    with db.reading() as session:
        rows = session.execute(
            select(OutboxEvent.event_id, OutboxEvent.type, OutboxEvent.member_id, OutboxEvent.payload).where(
                OutboxEvent.type.in_(["mobile_app_installed", "birthday"])
            )
        ).all()
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == {"ev-out", f"birthday:{member_id}:2026-05-17"}
    assert by_id["ev-out"][2] == member_id and by_id["ev-out"][3]["source"] == "mobile_app"
    assert by_id["ev-out"][3]["properties"] == {"platform": "ios"}
    assert by_id[f"birthday:{member_id}:2026-05-17"][1] == "birthday"


def test_a_batch_over_the_limit_is_too_large(api: Api, db: Database) -> None:
    _setup(api, db)
    event = {
        "type": "mobile_app_installed",
        "occurred_at": "2026-11-23T10:00:00Z",
        "member": {"card": "5550"},
    }
    batch = [{"id": f"e{i}", **event} for i in range(1001)]
    assert_error(api.post("/api/v1/events", json=batch), 413, "batch_too_large")
    with db.reading() as session:
        assert (
            session.scalar(select(OutboxEvent.seq).where(OutboxEvent.type == "mobile_app_installed")) is None
        )
