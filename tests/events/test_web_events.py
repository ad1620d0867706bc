"""Web, app and contact-centre events through POST /api/v1/events: every type lands in the outbox,
bad ones are rejected with their index, repeats are harmless, visitors are linked to members."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.events import service
from omniloyal.events.models import OutboxEvent
from omniloyal.members.models import AnonymousLink
from tests.conftest import Api, assert_error, make_key

ADMIN = "/api/v1/admin"
AT = "2026-11-23T10:00:00+03:00"


def _member(api: Api, phone: str = "+79001234567", email: str = "ivan@example.ru", card: str = "5550") -> int:
    created = api.post(
        f"{ADMIN}/members",
        json={
            "first_name": "Ivan",
            "phone": phone,
            "email": email,
            "cards": [{"number": card, "kind": "virtual", "state": "activated"}],
        },
    )
    assert created.status_code == 201, created.text
    member_id: int = created.json()["id"]
    return member_id


def _outbox(db: Database, type: str | None = None) -> list[dict[str, Any]]:
    """Envelopes in the outbox: of one type, or every ingested one (loyalty changes have dotted names)."""
    with db.reading() as session:
        stmt = select(OutboxEvent).order_by(OutboxEvent.seq)
        if type is not None:
            stmt = stmt.where(OutboxEvent.type == type)
        rows = [row.payload for row in session.scalars(stmt)]
    return rows if type is not None else [r for r in rows if "." not in r["type"]]


def _event(event_id: str, type: str, **fields: Any) -> dict[str, Any]:
    return {"id": event_id, "type": type, "occurred_at": AT, "anonymous_id": "visitor-1", **fields}


EVERY_TYPE = [
    _event("e1", "page_view", url="https://shop.example/?utm_source=yandex&utm_medium=cpc"),
    _event("e2", "section_view", properties={"section": "promo"}),
    _event("e3", "product_view", properties={"sku": "MILK-1", "price": 89.9}),
    _event("e4", "category_view", properties={"category": "Food/Dairy"}),
    _event("e5", "search", properties={"query": "молоко"}),
    _event("e6", "add_to_cart", properties={"sku": "MILK-1", "quantity": 2, "price": "89.90"}),
    _event("e7", "remove_from_cart", properties={"sku": "MILK-1"}),
    _event("e8", "order_placed", properties={"order_id": "A-1", "amount": "179.80"}),
    _event("e9", "order_paid", properties={"order_id": "A-1", "amount": "179.80"}),
    _event("e10", "order_cancelled", properties={"order_id": "A-1"}),
    _event("e11", "order_status_changed", properties={"order_id": "A-1", "status": "delivered"}),
    _event("e12", "login", member={"phone": "8 900 123-45-67"}),
    _event("e13", "registration", member={"email": "Ivan@Example.ru"}),
    _event("e14", "app_installed", source="mobile_app", properties={"platform": "ios"}),
    _event(
        "e15", "contact_center_call", member={"card": "5550"}, properties={"topic": "balance", "duration": 95}
    ),
    _event("e16", "custom", properties={"name": "quiz_done", "score": 7}),
    _event("e17", "identify", member={"card": "5550"}),
]


def test_every_web_type_is_accepted_and_written_to_the_outbox(api: Api, db: Database) -> None:
    member_id = _member(api)
    answer = api.post("/api/v1/events", json=EVERY_TYPE)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["accepted"], body["rejected"], body["duplicates"]) == (len(EVERY_TYPE), 0, 0), body
    assert [r["index"] for r in body["results"]] == list(range(len(EVERY_TYPE)))
    envelopes = {e["id"]: e for e in _outbox(db)}
    assert set(envelopes) == {e["id"] for e in EVERY_TYPE}
    assert {e["type"] for e in envelopes.values()} == {e["type"] for e in EVERY_TYPE}
    page = envelopes["e1"]
    assert page["utm"] == {"utm_source": "yandex", "utm_medium": "cpc"}
    assert page["source"] == "web" and page["anonymous_id"] == "visitor-1"
    assert page["properties"]["url"].startswith("https://shop.example/")
    assert page["occurred_at"].startswith("2026-11-23T07:00:00")  # stored in UTC
    # Numbers become decimal strings; defaults filled in.
    assert envelopes["e3"]["properties"]["price"] == "89.90"
    assert envelopes["e6"]["properties"] | {} == {"sku": "MILK-1", "quantity": "2", "price": "89.90"}
    assert envelopes["e7"]["properties"]["quantity"] == "1"
    assert envelopes["e8"]["properties"]["status"] == "placed"
    assert envelopes["e15"]["properties"]["duration"] == 95
    assert envelopes["e15"]["source"] == "contact_center"
    # Identified events carry the member, whatever identifier was used.
    for event_id in ("e12", "e13", "e15", "e17"):
        assert envelopes[event_id]["member_id"] == member_id, event_id
    # The visitor logged in: every later anonymous event of it belongs to the member.
    assert envelopes["e16"]["member_id"] == member_id


def test_bad_events_are_rejected_with_their_index_and_the_rest_kept(api: Api, db: Database) -> None:
    batch: list[Any] = [
        _event("ok-1", "page_view"),
        _event("no-sku", "product_view", properties={"price": "10"}),
        _event("bad-qty", "add_to_cart", properties={"sku": "A", "quantity": 0}),
        _event("bad-price", "order_paid", properties={"order_id": "1", "amount": "-5"}),
        {"id": "who", "type": "page_view", "occurred_at": AT},
        _event("naive", "page_view", occurred_at="2026-11-23T10:00:00"),
        _event("odd", "teleported"),
        _event("utm", "page_view", utm={"campaign": "x", "colour": "red"}),
        _event("shop", "page_view", store="NOPE"),
        "not an event",
        _event("ok-2", "search", properties={"query": "хлеб"}, utm={"campaign": "bread"}),
    ]
    body = api.post("/api/v1/events", json=batch).json()
    assert (body["accepted"], body["rejected"]) == (2, 9), body
    codes = {r["index"]: r["error"]["code"] for r in body["results"] if r["status"] == "rejected"}
    assert codes == {
        1: "missing_property",
        2: "invalid_property",
        3: "invalid_property",
        4: "identity_required",
        5: "invalid_time",
        6: "unknown_event_type",
        7: "unknown_field",
        8: "unknown_store",
        9: "invalid_value",
    }
    fields = {r["index"]: r["error"]["field"] for r in body["results"] if r["status"] == "rejected"}
    assert fields[1] == "properties.sku" and fields[7] == "utm.colour"
    kept = {e["id"]: e for e in _outbox(db)}
    assert set(kept) == {"ok-1", "ok-2"}
    assert kept["ok-2"]["utm"] == {"utm_campaign": "bread"}


def test_a_batch_over_1000_is_refused_whole(api: Api, db: Database) -> None:
    batch = [_event(f"e{i}", "page_view") for i in range(1001)]
    assert_error(api.post("/api/v1/events", json=batch), 413, "batch_too_large")
    assert _outbox(db) == []
    assert_error(api.post("/api/v1/events", content=b"{not json"), 400, "invalid_json")
    full = api.post("/api/v1/events", json={"events": batch[:1000]}).json()
    assert full["accepted"] == 1000


def test_repeated_ids_are_duplicates_and_change_nothing(api: Api, db: Database) -> None:
    first = api.post("/api/v1/events", json=[_event("a", "page_view"), _event("a", "page_view")]).json()
    assert [r["status"] for r in first["results"]] == ["accepted", "duplicate"]
    again = api.post("/api/v1/events", json=[_event("a", "page_view"), _event("b", "page_view")]).json()
    assert [r["status"] for r in again["results"]] == ["duplicate", "accepted"]
    assert [e["id"] for e in _outbox(db)] == ["a", "b"]


def test_member_events_still_run_offers_and_also_reach_the_outbox(api: Api, db: Database) -> None:
    member_id = _member(api)
    event = {
        "id": "install-1",
        "type": "mobile_app_installed",
        "occurred_at": AT,
        "member": {"card": "5550"},
        "properties": {"platform": "android"},
    }
    assert api.post("/api/v1/events", json=[event]).json()["accepted"] == 1
    assert api.post("/api/v1/events", json=[event]).json()["duplicates"] == 1
    [envelope] = _outbox(db, "mobile_app_installed")
    assert envelope["member_id"] == member_id and envelope["properties"] == {"platform": "android"}


def test_login_links_the_visitor_once_and_later_visits_belong_to_the_member(api: Api, db: Database) -> None:
    member_id = _member(api)
    before = [
        _event("v1", "page_view", anonymous_id="cookie-1"),
        _event("v2", "page_view", anonymous_id="cookie-1"),
    ]
    assert api.post("/api/v1/events", json=before).json()["accepted"] == 2
    login = _event("l1", "login", anonymous_id="cookie-1", member={"email": "IVAN@example.ru"})
    assert api.post("/api/v1/events", json=[login]).json()["accepted"] == 1
    again = _event("l2", "login", anonymous_id="cookie-1", member={"phone": "+7 900 123 45 67"})
    after = _event("v3", "page_view", anonymous_id="cookie-1")
    assert api.post("/api/v1/events", json=[again, after]).json()["accepted"] == 2
    links = _outbox(db, "identity.linked")
    assert len(links) == 1
    assert links[0]["member_id"] == member_id and links[0]["properties"]["anonymous_id"] == "cookie-1"
    assert links[0]["properties"]["history_days"] == 60
    with db.reading() as session:
        rows = session.execute(select(AnonymousLink.anonymous_id, AnonymousLink.member_id)).all()
    assert [tuple(r) for r in rows] == [("cookie-1", member_id)]
    by_id = {e["id"]: e for e in _outbox(db)}
    assert by_id["v1"]["member_id"] is None  # history is re-keyed by the warehouse, not rewritten
    assert by_id["v3"]["member_id"] == member_id


def test_a_click_from_a_message_links_the_visitor(api: Api, db: Database) -> None:
    member_id = _member(api)
    click = _event(
        "c1",
        "page_view",
        anonymous_id="cookie-9",
        member={"id": member_id},
        properties={"message_id": "m-77"},
    )
    plain = _event("c2", "page_view", anonymous_id="cookie-8", member={"id": member_id})
    assert api.post("/api/v1/events", json=[click, plain]).json()["accepted"] == 2
    assert [e["anonymous_id"] for e in _outbox(db, "identity.linked")] == ["cookie-9"]


def test_a_click_links_the_visitor_to_whom_messaging_sent_the_message(api: Api, db: Database) -> None:
    member_id = _member(api)

    def sent_to(_session: Any, message_ids: set[str]) -> dict[str, int]:
        return {m: member_id for m in message_ids if m == "m-1"}

    service.register_message_lookup(sent_to)
    try:
        clicks = [
            _event("k1", "page_view", anonymous_id="cookie-5", properties={"message_id": "m-1"}),
            _event("k2", "page_view", anonymous_id="cookie-6", properties={"message_id": "m-unknown"}),
        ]
        assert api.post("/api/v1/events", json=clicks).json()["accepted"] == 2
    finally:
        service._message_lookups.remove(sent_to)
    assert [(e["anonymous_id"], e["member_id"]) for e in _outbox(db, "identity.linked")] == [
        ("cookie-5", member_id)
    ]
    assert {e["id"]: e["member_id"] for e in _outbox(db)} == {"k1": member_id, "k2": None}


def test_unknown_members_keep_the_visit_when_the_visitor_is_known(api: Api, db: Database) -> None:
    _member(api)
    body = api.post(
        "/api/v1/events",
        json=[
            _event("u1", "login", member={"email": "stranger@example.ru"}),
            {"id": "u2", "type": "login", "occurred_at": AT, "member": {"email": "stranger@example.ru"}},
            _event("u3", "login", member={"phone": "12"}),
        ],
    ).json()
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "rejected"]
    assert body["results"][0]["warning"] == "unknown_member"
    assert body["results"][1]["error"]["code"] == "unknown_member"
    assert body["results"][2]["error"]["code"] == "invalid_phone"
    assert _outbox(db, "identity.linked") == []


def test_a_client_key_sends_events_of_its_own_member_only(api: Api, db: Database) -> None:
    mine = _member(api)
    other = _member(api, phone="+79007654321", email="olga@example.ru", card="5551")
    client = api.as_key(make_key(db, "client", member_id=mine))
    body = client.post(
        "/api/v1/events",
        json=[
            {"id": "k1", "type": "app_installed", "occurred_at": AT},
            _event("k2", "page_view", member={"id": other}),
            _event("k3", "page_view", member={"card": "5550"}),
        ],
    ).json()
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "accepted"]
    assert body["results"][1]["error"]["code"] == "member_scope"
    assert {e["id"]: e["member_id"] for e in _outbox(db)} == {"k1": mine, "k3": mine}
    analyst = api.as_key(make_key(db, "analyst"))
    assert_error(analyst.post("/api/v1/events", json=[_event("z", "page_view")]), 403, "forbidden")
    assert_error(api.as_key("nope").post("/api/v1/events", json=[]), 401, "invalid_api_key")
    assert_error(api.client.post("/api/v1/events", json=[]), 401, "missing_api_key")


def test_a_beacon_sends_text_plain_with_the_key_in_the_body(api: Api, db: Database) -> None:
    body = json.dumps({"key": api.key, "events": [_event("b1", "page_view")]})
    answer = api.client.post(
        "/api/v1/events", content=body, headers={"Content-Type": "text/plain;charset=UTF-8"}
    )
    assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text


def test_a_tracker_key_sends_web_events_but_never_runs_offers(api: Api, db: Database) -> None:
    member_id = _member(api)
    tracker = Principal.model_construct(
        key_id=None, name="site", role="tracker", store_id=None, member_id=None
    )
    answer = service.ingest(
        db,
        tracker,
        [
            _event("t1", "page_view"),
            {"id": "t2", "type": "mobile_app_installed", "occurred_at": AT, "member": {"id": member_id}},
        ],
        "RU",
        "Europe/Moscow",
    )
    assert [r.status for r in answer.results] == ["accepted", "rejected"]
    assert answer.results[1].error is not None and answer.results[1].error["code"] == "forbidden_event_type"


def test_the_same_batch_sent_twice_at_once_is_accepted_once(api: Api, db: Database) -> None:
    import threading

    admin = Principal.model_construct(key_id=None, name="admin", role="admin", store_id=None, member_id=None)
    batch = [_event(f"race-{i}", "page_view") for i in range(200)]
    answers: list[Any] = []
    barrier = threading.Barrier(2)

    def send() -> None:
        barrier.wait()
        answers.append(service.ingest(db, admin, batch, "RU", "Europe/Moscow"))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted((a.accepted, a.duplicates) for a in answers) == [(0, 200), (200, 0)]
    assert len(_outbox(db)) == 200


def test_ingested_events_reach_consumers_as_the_envelopes_sent(api: Api, db: Database) -> None:
    from datetime import UTC, datetime

    from omniloyal.events.bus.memory import MemoryBus
    from omniloyal.events.dispatcher import Dispatcher
    from omniloyal.events.envelope import EventEnvelope

    member_id = _member(api)
    batch = [
        _event(
            "p1",
            "product_view",
            member={"id": member_id},
            url="https://shop.example/milk?utm_source=ads&utm_campaign=spring",
            properties={"sku": "MILK-1", "price": 89.9, "note": "молоко"},
        ),
        _event("p2", "page_view", utm={"campaign": "bread"}),
    ]
    assert api.post("/api/v1/events", json=batch).json()["accepted"] == 2
    bus = MemoryBus()
    bus.subscribe("probe")
    Dispatcher(db, bus).run_once()
    received: list[EventEnvelope] = []
    bus.consume("probe", received.extend, max_batch=100, timeout=0)
    first, second = [e for e in received if e.id in ("p1", "p2")]
    assert first.id == "p1" and first.type == "product_view" and first.member_id == member_id
    assert first.occurred_at == datetime(2026, 11, 23, 7, 0, tzinfo=UTC)
    assert first.properties == {
        "sku": "MILK-1",
        "price": "89.90",
        "note": "молоко",
        "url": "https://shop.example/milk?utm_source=ads&utm_campaign=spring",
    }
    assert first.utm == {"utm_source": "ads", "utm_campaign": "spring"}
    assert (first.source, first.anonymous_id, first.store) == ("web", "visitor-1", None)
    assert second.utm == {"utm_campaign": "bread"} and second.member_id is None
    # Stored as the envelope's own JSON: what the bus carries is what was written.
    with db.reading() as session:
        payload = session.scalar(select(OutboxEvent.payload).where(OutboxEvent.event_id == "p1"))
    assert EventEnvelope.model_validate(payload) == first
