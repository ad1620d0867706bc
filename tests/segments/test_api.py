"""The segments admin API: definitions with validation and cycle refusal, live counts, samples,
builds with history, memberships, CSV export, roles."""

from __future__ import annotations

import csv
import io

from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from tests.analytics.helpers import registered
from tests.conftest import Api, assert_error, make_key
from tests.segments.data import fill
from tests.segments.helpers import SEGMENTS, create, last_seq, ok, outbox

MOSCOW = {"type": "profile", "field": "city", "op": "eq", "value": "Moscow"}
MALE = {"type": "profile", "field": "gender", "op": "eq", "value": "male"}


def test_definitions_are_created_read_listed_changed_and_deleted(api: Api) -> None:
    created = create(api, MOSCOW, name="Moscow", description="Customers in Moscow")
    assert created["kind"] == "dynamic" and created["status"] == "active" and created["version"] == 1
    assert created["conditions"] == MOSCOW
    assert (created["member_count"], created["refreshed_at"], created["last_error"]) == (None, None, None)
    second = create(api, {"all": [MALE]}, name="Men", kind="static")
    assert ok(api.get(f"{SEGMENTS}/{created['id']}"))["name"] == "Moscow"
    page = ok(api.get(SEGMENTS, params={"limit": 1}))
    assert [s["id"] for s in page["items"]] == [created["id"]] and page["next_cursor"]
    rest = ok(api.get(SEGMENTS, params={"limit": 1, "cursor": page["next_cursor"]}))
    assert [s["id"] for s in rest["items"]] == [second["id"]] and rest["next_cursor"] is None

    changed = ok(
        api.patch(
            f"{SEGMENTS}/{created['id']}", json={"name": "Muscovites", "conditions": {"all": [MOSCOW, MALE]}}
        )
    )
    assert (changed["name"], changed["version"]) == ("Muscovites", 2)
    archived = ok(api.patch(f"{SEGMENTS}/{created['id']}", json={"status": "archived"}))
    assert archived["status"] == "archived" and archived["version"] == 2
    assert [s["id"] for s in ok(api.get(SEGMENTS, params={"status": "archived"}))["items"]] == [created["id"]]

    assert api.delete(f"{SEGMENTS}/{created['id']}").status_code == 204
    assert_error(api.get(f"{SEGMENTS}/{created['id']}"), 404, "unknown_segment")


def test_a_bad_node_is_refused_with_its_path(api: Api) -> None:
    bad = {"all": [MOSCOW, MALE, {"any": [{"type": "profile", "field": "age", "op": "gte", "value": "old"}]}]}
    assert_error(
        api.post(SEGMENTS, json={"name": "x", "conditions": bad}),
        422,
        "invalid_value",
        "conditions.all[2].any[0].value",
    )
    assert_error(
        api.post(SEGMENTS, json={"name": "x", "conditions": {"type": "nope"}}),
        422,
        "unknown_condition",
        "conditions.type",
    )
    assert_error(api.post(SEGMENTS, json={"conditions": MOSCOW}), 422, "missing_field", "name")
    assert_error(
        api.post(SEGMENTS, json={"name": "x", "conditions": {"type": "audience", "audiences": ["nobody"]}}),
        422,
        "unknown_audience",
        "conditions.audiences[0]",
    )
    assert_error(
        api.post(
            SEGMENTS,
            json={"name": "x", "conditions": {"any": [MOSCOW, {"type": "purchases", "groups": ["nope"]}]}},
        ),
        422,
        "unknown_product_group",
        "conditions.any[1].groups[0]",
    )
    assert_error(
        api.post(SEGMENTS, json={"name": "x", "conditions": MOSCOW, "audience": "nobody"}),
        404,
        "unknown_audience",
        "audience",
    )
    # The unsaved count validates the same way.
    assert_error(
        api.post(f"{SEGMENTS}/count", json={"conditions": bad}),
        422,
        "invalid_value",
        "conditions.all[2].any[0].value",
    )


def test_membership_of_another_segment_refuses_cycles(api: Api) -> None:
    a = create(api, MOSCOW, name="A")
    b = create(api, {"all": [{"type": "segment", "segment": a["id"]}, MALE]}, name="B")
    c = create(api, {"not": {"type": "segment", "segment": b["id"]}}, name="C")
    assert (ok(api.get(f"{SEGMENTS}/{a['id']}"))["used_by"], b["uses"]) == ([b["id"]], [a["id"]])
    # A -> C -> B -> A would be circular.
    assert_error(
        api.patch(
            f"{SEGMENTS}/{a['id']}",
            json={"conditions": {"any": [MOSCOW, {"type": "segment", "segment": c["id"]}]}},
        ),
        422,
        "segment_cycle",
        "conditions.any[1].segment",
    )
    assert_error(
        api.patch(f"{SEGMENTS}/{a['id']}", json={"conditions": {"type": "segment", "segment": a["id"]}}),
        422,
        "segment_cycle",
        "conditions.segment",
    )
    assert_error(
        api.post(SEGMENTS, json={"name": "x", "conditions": {"type": "segment", "segment": 999}}),
        422,
        "unknown_segment",
        "conditions.segment",
    )
    # Still used: cannot be deleted.
    assert_error(api.delete(f"{SEGMENTS}/{a['id']}"), 409, "segment_in_use")
    assert api.delete(f"{SEGMENTS}/{c['id']}").status_code == 204
    assert api.delete(f"{SEGMENTS}/{b['id']}").status_code == 204
    assert api.delete(f"{SEGMENTS}/{a['id']}").status_code == 204


def test_live_counts_of_saved_and_unsaved_definitions_and_a_sample(api: Api, wh: Warehouse) -> None:
    fill(wh)
    counted = ok(api.post(f"{SEGMENTS}/count", json={"conditions": MOSCOW}))
    assert counted["count"] == 2 and counted["engine"] == wh.dialect and counted["took_ms"] >= 0
    moscow = create(api, MOSCOW)
    nested = create(api, {"all": [{"type": "segment", "segment": moscow["id"]}, MALE]})
    assert ok(api.get(f"{SEGMENTS}/{moscow['id']}/count"))["count"] == 2
    assert ok(api.get(f"{SEGMENTS}/{nested['id']}/count"))["count"] == 1
    sample = ok(api.get(f"{SEGMENTS}/{moscow['id']}/sample", params={"limit": 1}))
    assert sample["count"] == 2
    assert sample["members"] == [
        {
            "member_id": 1,
            "external_id": None,
            "first_name": "Anna",
            "last_name": "Petrova",
            "gender": "female",
            "city": "Moscow",
            "email": "anna@example.com",
            "phone": "+79001234567",
        }
    ]
    assert_error(
        api.get(f"{SEGMENTS}/{moscow['id']}/sample", params={"limit": 0}), 400, "invalid_limit", "limit"
    )
    assert_error(api.get(f"{SEGMENTS}/999/count"), 404, "unknown_segment")


def test_builds_keep_a_snapshot_with_history_and_emit_entries_after_the_first(
    api: Api, db: Database, wh: Warehouse
) -> None:
    fill(wh)
    moscow = create(api, MOSCOW)
    seq = last_seq(db)
    first = ok(api.post(f"{SEGMENTS}/{moscow['id']}/materialise"))
    assert (first["member_count"], first["entered"], first["left"], first["cause"]) == (
        2,
        2,
        0,
        "materialise",
    )
    # The first build emits nothing (everyone would "enter").
    assert outbox(db, "segment.entered", "segment.left", after=seq) == []
    stored = ok(api.get(f"{SEGMENTS}/{moscow['id']}"))
    assert stored["member_count"] == 2 and stored["materialised_at"] and stored["refreshed_at"]
    assert [m["member_id"] for m in ok(api.get(f"{SEGMENTS}/{moscow['id']}/members"))["items"]] == [1, 4]

    # Clara moves to Moscow, Dmitry leaves it.
    load(
        wh,
        [
            registered(3, minutes=10, city="Moscow", first_name="Clara"),
            registered(40, minutes=11, city="Tver"),
        ],
    )
    load(wh, [registered(4, minutes=12, city="Tver", first_name="Dmitry")])
    second = ok(api.post(f"{SEGMENTS}/{moscow['id']}/materialise"))
    assert (second["member_count"], second["entered"], second["left"]) == (2, 1, 1)
    events = outbox(db, "segment.entered", "segment.left", after=seq)
    assert sorted((e.type, e.member_id) for e in events) == [("segment.entered", 3), ("segment.left", 4)]
    assert all(
        e.properties["segment"] == moscow["id"] and e.properties["cause"] == "materialise" for e in events
    )

    page = ok(api.get(f"{SEGMENTS}/{moscow['id']}/members", params={"limit": 1}))
    assert [m["member_id"] for m in page["items"]] == [1]
    rest = ok(api.get(f"{SEGMENTS}/{moscow['id']}/members", params={"cursor": page["next_cursor"]}))
    assert [m["member_id"] for m in rest["items"]] == [3]
    changes = ok(api.get(f"{SEGMENTS}/{moscow['id']}/changes"))
    assert {(c["member_id"], c["change"]) for c in changes[:2]} == {(3, "entered"), (4, "left")}
    assert len(changes) == 4
    history = ok(api.get(f"{SEGMENTS}/{moscow['id']}/history"))
    assert [(h["member_count"], h["entered"], h["left"]) for h in history] == [(2, 1, 1), (2, 2, 0)]


def test_csv_export_lists_the_current_members(api: Api, wh: Warehouse) -> None:
    fill(wh)
    moscow = create(api, MOSCOW)
    response = api.get(f"{SEGMENTS}/{moscow['id']}/export.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["member_id"], r["first_name"], r["city"]) for r in rows] == [
        ("1", "Anna", "Moscow"),
        ("4", "Dmitry", "Moscow"),
    ]


def test_roles_marketers_write_analysts_read(api: Api, db: Database, wh: Warehouse) -> None:
    moscow = create(api, MOSCOW)
    analyst = api.as_key(make_key(db, "analyst", name="analyst"))
    operator = api.as_key(make_key(db, "operator", name="operator"))
    assert analyst.get(f"{SEGMENTS}/{moscow['id']}/count").status_code == 200
    assert_error(analyst.post(SEGMENTS, json={"name": "x", "conditions": MOSCOW}), 403, "forbidden")
    assert_error(analyst.post(f"{SEGMENTS}/{moscow['id']}/materialise"), 403, "forbidden")
    assert_error(operator.get(SEGMENTS), 403, "forbidden")
    marketer = api.as_key(make_key(db, "marketer", name="marketer"))
    assert marketer.post(SEGMENTS, json={"name": "x", "conditions": MOSCOW}).status_code == 201


def test_changing_the_conditions_of_a_built_segment_rebuilds_it(
    api: Api, db: Database, wh: Warehouse
) -> None:
    fill(wh)
    segment = create(api, MOSCOW)
    ok(api.post(f"{SEGMENTS}/{segment['id']}/materialise"))
    seq = last_seq(db)
    changed = ok(api.patch(f"{SEGMENTS}/{segment['id']}", json={"conditions": {"all": [MOSCOW, MALE]}}))
    assert (changed["version"], changed["member_count"]) == (2, 1)
    events = outbox(db, "segment.entered", "segment.left", after=seq)
    assert [(e.type, e.member_id, e.properties["cause"]) for e in events] == [
        ("segment.left", 1, "definition")
    ]
    # A rename changes no membership and rebuilds nothing.
    ok(api.patch(f"{SEGMENTS}/{segment['id']}", json={"name": "Moscow men"}))
    assert len(ok(api.get(f"{SEGMENTS}/{segment['id']}/history"))) == 2
