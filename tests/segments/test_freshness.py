"""Dynamic segments kept fresh from events: only the touched members are re-evaluated, the
membership, entries and exits, synchronised audiences and ``refreshed_at`` follow within the
batch, and the loyalty side's facts (balances, cards, audiences) are mirrored on the way."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from omniloyal.analytics import sink
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from omniloyal.events import consumers
from omniloyal.events.outbox import envelope
from omniloyal.kernel.clock import utcnow
from omniloyal.segments import freshness, service
from tests.conftest import Api
from tests.segments.helpers import (
    ADMIN,
    KAZAN,
    SEGMENTS,
    cheque_discount,
    create,
    last_seq,
    new_member,
    ok,
    outbox,
    shop,
)


def deliver(db: Database, wh: Warehouse, after: int) -> float:
    """Hands the outbox's new events to the consumer, as the runtime does; returns seconds taken."""
    started = time.perf_counter()
    freshness.handle(db, wh, outbox(db, after=after))
    return time.perf_counter() - started


def test_members_enter_and_leave_from_events_and_the_synchronised_audience_follows(
    api: Api, db: Database, wh: Warehouse
) -> None:
    till = shop(api, db)
    first = new_member(api, "1000", "Kazan")
    deliver(db, wh, 0)
    segment = create(api, KAZAN, audience="kazan")
    ok(api.post(f"{SEGMENTS}/{segment['id']}/materialise"))
    built = ok(api.get(f"{SEGMENTS}/{segment['id']}"))
    assert built["member_count"] == 1 and ok(api.get(f"{ADMIN}/audiences/kazan"))["member_count"] == 1

    seq = last_seq(db)
    second = new_member(api, "3000", "Kazan")
    api.patch(f"{ADMIN}/members/{first}", json={"city": "Moscow"})
    took = deliver(db, wh, seq)
    assert took < 5
    fresh = ok(api.get(f"{SEGMENTS}/{segment['id']}"))
    assert fresh["member_count"] == 1 and fresh["refreshed_at"] > built["refreshed_at"]
    assert fresh["materialised_at"] == built["materialised_at"]
    assert [m["member_id"] for m in ok(api.get(f"{SEGMENTS}/{segment['id']}/members"))["items"]] == [second]
    changes = sorted((e.type, e.member_id) for e in outbox(db, "segment.entered", "segment.left", after=seq))
    assert changes == [("segment.entered", second), ("segment.left", first)]
    assert cheque_discount(till, "c1", "3000") == "20.00" and cheque_discount(till, "c2", "1000") == "0.00"
    history = ok(api.get(f"{SEGMENTS}/{segment['id']}/history"))
    assert (history[0]["cause"], history[0]["entered"], history[0]["left"]) == ("events", 1, 1)

    # Delivered again (at least once): nothing changes, nothing is emitted twice.
    again = last_seq(db)
    deliver(db, wh, seq)
    assert outbox(db, "segment.entered", "segment.left", after=again) == []


def test_web_events_and_loyalty_facts_refresh_the_segments_that_use_them(
    api: Api, db: Database, wh: Warehouse
) -> None:
    ok(api.post(f"{ADMIN}/legal-entities", json={"code": "LE", "name": "Retail LLC"}), 201)
    member = new_member(api, "1000", "Kazan")
    other = new_member(api, "2000", "Kazan")
    deliver(db, wh, 0)
    viewers = create(
        api, {"type": "web", "action": "viewed_product", "values": ["MILK"], "period": {"days": 7}}
    )
    rich = create(api, {"type": "balance", "currency": "bonus", "op": "gte", "value": 100})
    blocked = create(api, {"type": "card", "blocked": True})
    for segment in (viewers, rich, blocked):
        assert ok(api.post(f"{SEGMENTS}/{segment['id']}/materialise"))["member_count"] == 0

    seq = last_seq(db)
    view = envelope("v1", "product_view", member_id=member, source="web", properties={"sku": "MILK"})
    ok(
        api.post(
            f"{ADMIN}/members/{other}/ledger", json={"kind": "accrual", "amount": "150", "reason": "gift"}
        ),
        201,
    )
    ok(api.post(f"{ADMIN}/cards/2000/block", json={"reason": "lost"}))
    started = time.perf_counter()
    freshness.handle(db, wh, [view, *outbox(db, after=seq)])
    assert time.perf_counter() - started < 5
    assert [m["member_id"] for m in ok(api.get(f"{SEGMENTS}/{viewers['id']}/members"))["items"]] == [member]
    assert [m["member_id"] for m in ok(api.get(f"{SEGMENTS}/{rich['id']}/members"))["items"]] == [other]
    assert [m["member_id"] for m in ok(api.get(f"{SEGMENTS}/{blocked['id']}/members"))["items"]] == [other]
    entered = {(e.properties["segment"], e.member_id) for e in outbox(db, "segment.entered", after=seq)}
    assert entered == {(viewers["id"], member), (rich["id"], other), (blocked["id"], other)}


def test_static_segments_and_segments_never_built_are_left_alone(
    api: Api, db: Database, wh: Warehouse
) -> None:
    new_member(api, "1000", "Kazan")
    deliver(db, wh, 0)
    static = create(api, KAZAN, kind="static")
    ok(api.post(f"{SEGMENTS}/{static['id']}/materialise"))
    unbuilt = create(api, KAZAN)
    seq = last_seq(db)
    new_member(api, "2000", "Kazan")
    deliver(db, wh, seq)
    assert ok(api.get(f"{SEGMENTS}/{static['id']}"))["member_count"] == 1
    assert ok(api.get(f"{SEGMENTS}/{unbuilt['id']}"))["refreshed_at"] is None
    # The periodic refresh rebuilds dynamic segments only.
    rebuilt = ok(api.post(f"{SEGMENTS}/refresh"))
    assert [(b["segment_id"], b["member_count"], b["cause"]) for b in rebuilt] == [
        (unbuilt["id"], 2, "scheduled")
    ]


def test_a_failing_refresh_is_recorded_on_the_segment(api: Api, db: Database, wh: Warehouse) -> None:
    member = new_member(api, "1000", "Kazan")
    deliver(db, wh, 0)
    segment = create(api, KAZAN)
    ok(api.post(f"{SEGMENTS}/{segment['id']}/materialise"))
    wh.execute(f"DROP TABLE {wh.qualified('segment_members')}")
    seq = last_seq(db)
    api.patch(f"{ADMIN}/members/{member}", json={"city": "Moscow"})
    deliver(db, wh, seq)
    failed = ok(api.get(f"{SEGMENTS}/{segment['id']}"))
    assert failed["last_error"] and failed["last_error_at"]
    assert utcnow() - timedelta(minutes=1) < datetime.fromisoformat(failed["last_error_at"])


def test_the_consumer_is_registered_for_every_event_type() -> None:
    consumer = consumers.registry.get(freshness.CONSUMER_NAME)
    assert consumer.types == ("#",) and consumer.factory is not None


def test_through_the_event_runtime_an_offer_follows_the_segment_within_seconds(
    api: Api, db: Database, wh: Warehouse, settings: Any
) -> None:
    """Outbox -> bus -> the ``warehouse`` and ``segments`` consumers -> membership, audience,
    and the till's discount: the whole path, timed."""
    own = consumers.Registry()
    own.register_factory(sink.CONSUMER_NAME, sink.handler_factory)
    own.register_factory(freshness.CONSUMER_NAME, freshness.handler_factory)
    till = shop(api, db)
    with consumers.Runtime(settings, db, registry=own, poll_timeout=0.1, idle_interval=0.02) as runtime:
        new_member(api, "1000", "Kazan")
        assert runtime.drain(20)
        segment = create(api, KAZAN, audience="kazan")
        assert ok(api.post(f"{SEGMENTS}/{segment['id']}/materialise"))["member_count"] == 1
        started = time.perf_counter()
        new_member(api, "3000", "Kazan")
        assert runtime.drain(20)
        took = time.perf_counter() - started
        assert ok(api.get(f"{SEGMENTS}/{segment['id']}"))["member_count"] == 2
        assert cheque_discount(till, "r1", "3000") == "20.00"
        assert took < 5


def test_scheduled_jobs_rebuild_segments_and_rfm_where_the_consumer_runs(
    api: Api, db: Database, wh: Warehouse, settings: Any
) -> None:
    """Conditions that time alone makes true are caught by the scheduled rebuild, which runs in
    the process of the ``segments`` consumer (the one holding the warehouse)."""
    jobs = {job.name: job for job in consumers.registry.jobs()}
    refresh, recompute = jobs["segments-refresh"], jobs["rfm-recompute"]
    assert refresh.consumer == recompute.consumer == freshness.CONSUMER_NAME
    assert refresh.interval(settings) == 15 * 60 and recompute.interval(settings) == 24 * 3600
    assert refresh.interval(settings.model_copy(update={"segments_refresh_minutes": 0})) == 0

    new_member(api, "1000", "Kazan")
    deliver(db, wh, 0)
    segment = create(api, KAZAN)
    refresh.factory(settings, db)()
    assert ok(api.get(f"{SEGMENTS}/{segment['id']}"))["member_count"] == 1
    assert [p["cause"] for p in ok(api.get(f"{SEGMENTS}/{segment['id']}/history"))] == ["scheduled"]
    recompute.factory(settings, db)()  # no purchases yet: an empty run, not a failure


def test_a_batch_of_site_events_reruns_only_the_segments_that_read_events(
    api: Api, db: Database, wh: Warehouse, monkeypatch: Any
) -> None:
    member = new_member(api, "1000", "Kazan")
    deliver(db, wh, 0)
    viewers = create(
        api, {"type": "web", "action": "viewed_product", "values": ["MILK"], "period": {"days": 7}}
    )
    kazan = create(api, KAZAN)
    # A segment built on the viewers' definition reads events too, through the reference.
    kazan_viewers = create(api, {"all": [{"type": "segment", "segment": viewers["id"]}, KAZAN]})
    for segment in (viewers, kazan, kazan_viewers):
        ok(api.post(f"{SEGMENTS}/{segment['id']}/materialise"))
    before = ok(api.get(f"{SEGMENTS}/{kazan['id']}"))
    queried: list[object] = []
    run = service._run_members
    monkeypatch.setattr(service, "_run_members", lambda wh, query: queried.append(query) or run(wh, query))

    view = envelope("v1", "product_view", member_id=member, source="web", properties={"sku": "MILK"})
    freshness.handle(db, wh, [view])
    assert len(queried) == 2  # viewers and kazan_viewers; the Kazan segment reads no events
    for segment in (viewers, kazan_viewers):
        items = ok(api.get(f"{SEGMENTS}/{segment['id']}/members"))["items"]
        assert [m["member_id"] for m in items] == [member]
    # Nothing the Kazan segment reads changed: it is as fresh as the batch, and says so.
    assert ok(api.get(f"{SEGMENTS}/{kazan['id']}"))["refreshed_at"] > before["refreshed_at"]

    # A batch with anything else in it (here the member moved) reruns every segment.
    seq = last_seq(db)
    api.patch(f"{ADMIN}/members/{member}", json={"city": "Moscow"})
    queried.clear()
    freshness.handle(
        db, wh, [envelope("v2", "page_view", member_id=member, source="web"), *outbox(db, after=seq)]
    )
    assert len(queried) == 3
    for segment in (kazan, kazan_viewers):
        assert ok(api.get(f"{SEGMENTS}/{segment['id']}/members"))["items"] == []


def test_what_a_batch_may_have_changed() -> None:
    web = [envelope(f"e{i}", t, member_id=1) for i, t in enumerate(["page_view", "login", "identity.linked"])]
    assert freshness.changed_tables(web) == {"events", "member_features"}
    assert freshness.changed_tables([*web, envelope("m", "message.clicked", member_id=1)]) == {
        "events",
        "member_features",
    }
    for other in (
        "purchase.confirmed",
        "points.accrued",
        "member.updated",
        "target_audience.changed",
        "new.kind",
    ):
        assert freshness.changed_tables([*web, envelope("x", other, member_id=1)]) is None
