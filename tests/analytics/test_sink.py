"""The sink on DuckDB and chdb: purchases, refunds, duplicates, identity links, merges."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from omniloyal.analytics.features import member_features
from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from tests.analytics.helpers import at, cancelled, linked, merged, purchase, refund, registered, web


def _features(wh: Warehouse, member_id: int) -> dict[str, Any]:
    row = member_features(wh, member_id)
    assert row is not None
    return row


def test_purchases_make_features(wh: Warehouse) -> None:
    load(
        wh,
        [
            purchase(
                1, 7, [("milk", "Food/Dairy/Milk", "100.00"), ("bread", "Food/Bakery", "50.00")], minutes=0
            ),
            purchase(
                2, 7, [("tv", "Electronics/TV", "1000.00")], minutes=10, store="S2", channel="online_store"
            ),
            purchase(3, 7, [("cheese", "Food/Dairy/Cheese", "300.00")], minutes=20, discount="30.00"),
        ],
    )
    f = _features(wh, 7)
    assert f["purchases_count"] == 3
    assert f["purchases_total"] == Decimal("1420.00")
    assert f["ltv"] == Decimal("1420.00")
    assert f["avg_cheque"] == Decimal("473.33")
    assert f["first_purchase_at"] == at(0)
    assert f["last_purchase_at"] == at(20)
    assert f["favourite_categories"] == ["Electronics/TV", "Food/Dairy/Cheese", "Food/Dairy/Milk"]
    assert f["favourite_stores"] == ["S2", "S1"]
    assert f["channels"] == ["offline", "online_store"]
    rows = wh.query(
        "SELECT operation, member_id, paid, points_accrued, status FROM {purchases} ORDER BY operation"
    )
    assert [(r["operation"], r["paid"], r["points_accrued"]) for r in rows] == [
        ("1", Decimal("150.00"), Decimal("5.00")),
        ("2", Decimal("1000.00"), Decimal("5.00")),
        ("3", Decimal("270.00"), Decimal("5.00")),
    ]
    assert wh.scalar("SELECT count(*) FROM {purchase_lines} WHERE member_id = 7") == 4


def test_duplicates_are_not_counted_twice(wh: Warehouse) -> None:
    first = purchase(1, 7, [("milk", "Food", "100.00")])
    page = web("w1", member_id=7, minutes=1)
    result = load(wh, [first, first, page])
    assert (result.loaded, result.duplicates) == (2, 1)
    again = load(wh, [first, page, purchase(2, 7, [("milk", "Food", "10.00")], minutes=2)])
    assert (again.loaded, again.duplicates) == (1, 2)
    assert load(wh, [first]).loaded == 0
    f = _features(wh, 7)
    assert f["purchases_count"] == 2
    assert f["purchases_total"] == Decimal("110.00")
    assert wh.scalar("SELECT count(*) FROM {events}") == 3
    assert wh.scalar("SELECT count(*) FROM {purchase_lines}") == 2


def test_refund_lowers_ltv_and_cancel_removes_the_purchase(wh: Warehouse) -> None:
    load(
        wh,
        [
            purchase(1, 7, [("milk", "Food", "100.00"), ("tv", "Electronics", "1000.00")]),
            purchase(2, 7, [("bread", "Food", "50.00")], minutes=5),
        ],
    )
    load(wh, [refund(10, 1, 7, [(2, "tv", "1000.00")], minutes=30)])
    f = _features(wh, 7)
    assert f["purchases_total"] == Decimal("1150.00")
    assert f["refunds_total"] == Decimal("1000.00")
    assert f["ltv"] == Decimal("150.00")
    assert f["favourite_categories"] == ["Food", "Electronics"]
    line = wh.query(
        "SELECT refunded_quantity, refunded_amount FROM {purchase_lines} WHERE operation = '1' AND line = 2"
    )
    assert line == [{"refunded_quantity": Decimal("1.000"), "refunded_amount": Decimal("1000.00")}]
    # The same refund again changes nothing.
    load(wh, [refund(10, 1, 7, [(2, "tv", "1000.00")], minutes=30)])
    assert _features(wh, 7)["ltv"] == Decimal("150.00")
    load(wh, [cancelled(2, 7, minutes=40)])
    f = _features(wh, 7)
    assert (f["purchases_count"], f["purchases_total"], f["ltv"]) == (
        1,
        Decimal("1100.00"),
        Decimal("100.00"),
    )
    assert wh.scalar("SELECT status FROM {purchases} WHERE operation = '2'") == "cancelled"


def test_refund_arriving_before_its_purchase_still_counts(wh: Warehouse) -> None:
    load(wh, [refund(10, 1, 7, [(1, "milk", "40.00")], minutes=30)])
    load(wh, [purchase(1, 7, [("milk", "Food", "100.00")])])
    f = _features(wh, 7)
    assert (f["purchases_total"], f["ltv"]) == (Decimal("100.00"), Decimal("60.00"))


def test_identity_link_moves_anonymous_history_to_the_member(wh: Warehouse) -> None:
    load(
        wh,
        [
            web("a1", anonymous_id="anon-1", minutes=0),
            web("a2", "product_view", anonymous_id="anon-1", minutes=1, sku="milk"),
            web("other", anonymous_id="anon-2", minutes=2),
        ],
    )
    assert member_features(wh, 7) is None
    load(wh, [linked(7, "anon-1", minutes=5)])
    rows = wh.query("SELECT id FROM {events} WHERE member_id = 7 ORDER BY id")
    assert [r["id"] for r in rows] == ["a1", "a2", "identity.linked:anon-1"]
    assert _features(wh, 7)["last_site_visit_at"] == at(1)
    # Later anonymous events of the linked visitor belong to the member too.
    load(wh, [web("a3", anonymous_id="anon-1", minutes=9)])
    assert wh.scalar("SELECT member_id FROM {events} WHERE id = 'a3'") == 7
    f = _features(wh, 7)
    assert f["last_site_visit_at"] == at(9)
    assert f["channels"] == ["web"]
    assert wh.scalar("SELECT member_id FROM {events} WHERE id = 'other'") is None


def test_merge_rekeys_the_duplicate(wh: Warehouse) -> None:
    load(
        wh,
        [
            registered(7),
            registered(8, first_name="Anya"),
            purchase(1, 7, [("milk", "Food", "100.00")]),
            purchase(2, 8, [("tv", "Electronics", "900.00")], minutes=3, store="S2"),
            web("w8", member_id=8, minutes=4),
        ],
    )
    load(wh, [merged(7, 8, minutes=10)])
    f = _features(wh, 7)
    assert f["purchases_count"] == 2
    assert f["ltv"] == Decimal("1000.00")
    assert f["last_site_visit_at"] == at(4)
    assert member_features(wh, 8) is None
    assert wh.scalar("SELECT count(*) FROM {events} WHERE member_id = 8") == 0
    assert wh.scalar("SELECT count(*) FROM {purchase_lines} WHERE member_id = 7") == 2
    snapshot = wh.query("SELECT status, merged_into FROM {members} WHERE member_id = 8")
    assert snapshot == [{"status": "merged", "merged_into": 7}]
    # An event for the duplicate arriving late goes to the member kept.
    load(wh, [web("late", member_id=8, minutes=12)])
    assert wh.scalar("SELECT member_id FROM {events} WHERE id = 'late'") == 7


def test_member_snapshot_keeps_the_newest(wh: Warehouse) -> None:
    load(wh, [registered(7)])
    from omniloyal.events.outbox import envelope

    update = envelope(
        "member.updated:7:1",
        "member.updated",
        member_id=7,
        occurred_at=at(5),
        properties={"member": {"first_name": "Anna", "city": "Kazan", "consents": {}}, "changed": ["city"]},
    )
    stale = envelope(
        "member.updated:7:0",
        "member.updated",
        member_id=7,
        occurred_at=at(1),
        properties={"member": {"city": "Omsk"}, "changed": ["city"]},
    )
    consent = envelope(
        "consent.changed:7:sms",
        "consent.changed",
        member_id=7,
        occurred_at=at(6),
        properties={"channel": "sms", "granted": True, "source": "web"},
    )
    load(wh, [update, consent])
    load(wh, [stale])
    rows = wh.query(
        "SELECT city, gender, birth_date, consent_email, consent_sms, pets FROM {members} WHERE member_id = 7"
    )
    assert len(rows) == 1
    assert rows[0]["city"] == "Kazan"
    assert rows[0]["gender"] == "female"
    assert str(rows[0]["birth_date"]) == "1990-05-17"
    assert rows[0]["consent_email"] is True
    assert rows[0]["consent_sms"] is True
    assert rows[0]["pets"] == ["cat"]


def test_the_newest_link_of_a_visitor_wins_whatever_the_order(wh: Warehouse) -> None:
    from omniloyal.events.outbox import envelope

    def link(member: int, minutes: float) -> Any:
        return envelope(
            f"identity.linked:v:{member}",
            "identity.linked",
            member_id=member,
            anonymous_id="v",
            occurred_at=at(minutes),
            source="web",
            properties={"anonymous_id": "v"},
        )

    load(wh, [link(2, 10)])
    load(wh, [link(1, 5)])  # older, delivered late
    load(wh, [web("after", anonymous_id="v", minutes=20)])
    assert wh.query("SELECT member_id, event_id FROM {identity_links}") == [
        {"member_id": 2, "event_id": "identity.linked:v:2"}
    ]
    assert wh.scalar("SELECT member_id FROM {events} WHERE id = 'after'") == 2


def test_a_batch_loaded_by_one_consumer_is_skipped_by_the_next_and_counted_once(wh: Warehouse) -> None:
    # The warehouse and the segments consumers both load every batch they receive.
    batch = [web(f"w{i}", member_id=7, minutes=i) for i in range(5)]
    first = load(wh, batch)
    second = load(wh, batch)
    assert (first.loaded, second.loaded, second.duplicates) == (5, 0, 5)
    assert wh.scalar("SELECT count(*) FROM {events}") == 5
    assert _features(wh, 7)["last_site_visit_at"] == at(4)


def test_events_are_loaded_again_after_the_warehouse_was_emptied(wh: Warehouse) -> None:
    batch = [web("w1", member_id=7), web("w2", anonymous_id="visitor-1", minutes=1)]
    load(wh, batch)
    wh.truncate()
    assert load(wh, batch).loaded == 2
    assert wh.scalar("SELECT count(*) FROM {events}") == 2


def test_a_load_rolled_back_with_its_transaction_is_not_taken_as_done(wh: Warehouse) -> None:
    batch = [web("w1", member_id=7), web("w2", member_id=8, minutes=1)]
    with pytest.raises(RuntimeError), wh.write_lock, wh.transaction():
        load(wh, batch)
        raise RuntimeError("the import failed after this batch")
    if wh.dialect == "duckdb":  # rolled back (ClickHouse keeps what it wrote: loading again is harmless)
        assert wh.scalar("SELECT count(*) FROM {events}") == 0
    load(wh, batch)
    assert wh.scalar("SELECT count(*) FROM {events}") == 2
    assert {r["member_id"] for r in wh.query("SELECT member_id FROM {member_features}")} == {7, 8}
