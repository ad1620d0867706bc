"""The RFM preset: quintile scores on the issue's worked example, named groups, matrices,
group moves as events, and RFM conditions in segments - on both warehouse engines."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal

import numpy as np

from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.segments import freshness, rfm
from tests.analytics.helpers import T0, purchase, registered
from tests.conftest import Api, assert_error
from tests.segments.data import NOW, days
from tests.segments.helpers import SEGMENTS, ok, outbox

AGES = [1, 3, 5, 10, 20, 40, 60, 90, 180, 300]


def worked_example(wh: Warehouse, now: datetime = NOW) -> None:
    """Ten members (ids 1..10) who last bought 1, 3, ... 300 days before ``now``; member n
    spent n * 100."""
    shift = (now - NOW).total_seconds() / 60
    load(
        wh,
        [
            purchase(n, n, [("MILK", "Food", f"{n * 100}.00")], minutes=shift + days(age))
            for n, age in enumerate(AGES, start=1)
        ],
    )


def test_worked_example_ten_members_fall_into_r5_to_r1_two_by_two(db: Database, wh: Warehouse) -> None:
    worked_example(wh)
    run = rfm.recompute(db, wh, now=NOW)
    assert run.members == 10 and run.period_days == 365
    assert run.boundaries.r == [3, 10, 40, 90]
    assert run.boundaries.f == [1, 1, 1, 1]
    assert run.boundaries.m == [Decimal("200.00"), Decimal("400.00"), Decimal("600.00"), Decimal("800.00")]
    scores = [rfm.member_scores(wh, n) for n in range(1, 11)]
    assert [s.r for s in scores] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert [s.recency_days for s in scores] == AGES
    assert [s.f for s in scores] == [1] * 10
    assert [s.m for s in scores] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [s.cell for s in scores[:2]] == ["R5F1M1", "R5F1M1"]
    assert [s.group for s in scores] == ["new", "new", "promising", "promising"] + ["hibernating"] * 4 + [
        "lost"
    ] * 2
    assert run.groups == {
        "best": 0,
        "lost": 2,
        "champions": 0,
        "new": 2,
        "promising": 2,
        "loyal": 0,
        "at_risk": 0,
        "hibernating": 4,
    }
    # Outside the period: no score.
    short = rfm.recompute(db, wh, now=NOW, period_days=30)
    assert short.members == 5


def test_scores_are_quintiles_by_nearest_rank_and_ties_score_alike() -> None:
    values = np.array([1, 1, 1, 1, 1, 1, 2, 2, 5, 9], dtype=np.int64)
    bounds = rfm.boundaries(values)
    assert bounds == [1, 1, 1, 2]
    assert rfm.score(values, bounds).tolist() == [1, 1, 1, 1, 1, 1, 4, 4, 5, 5]
    assert rfm.boundaries(np.array([], dtype=np.int64)) == []
    # Every one of the 125 cells has exactly one group; Best and Lost as the issue defines them.
    cells = {(r, f, m): rfm.group_of(r, f, m) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)}
    assert {c for c, g in cells.items() if g == "best"} == {(5, 5, 5)}
    assert {c for c, g in cells.items() if g == "lost"} == {
        (1, f, m) for f in range(1, 6) for m in range(1, 6)
    }
    assert set(cells.values()) == {g.code for g in rfm.GROUPS}


def test_moving_into_another_group_is_an_event(db: Database, wh: Warehouse) -> None:
    worked_example(wh)
    rfm.recompute(db, wh, now=NOW)
    assert outbox(db, rfm.GROUP_ENTERED) == []  # the first run moves nobody
    # Member 10 (lost) buys again: a rescore with the run's boundaries moves them.
    load(wh, [purchase(110, 10, [("MILK", "Food", "50.00")], minutes=0)])
    moved = rfm.rescore(db, wh, [10], now=NOW)
    assert moved == 1
    (event,) = outbox(db, rfm.GROUP_ENTERED)
    assert event.member_id == 10
    assert event.properties == {"group": "best", "previous_group": "lost", "cell": "R5F5M5"}
    assert rfm.member_scores(wh, 10).group == "best"
    # A full recompute later: only members whose group changed produce events.
    load(wh, [purchase(109, 9, [("MILK", "Food", "10.00")], minutes=days(0.5))])
    rfm.recompute(db, wh, now=NOW + timedelta(minutes=1))
    events = outbox(db, rfm.GROUP_ENTERED)
    assert all(e.properties["group"] != e.properties["previous_group"] for e in events)
    assert 9 in {e.member_id for e in events[1:]}


def test_the_freshness_consumer_rescores_buyers(db: Database, wh: Warehouse) -> None:
    now = utcnow()
    worked_example(wh, now)
    rfm.recompute(db, wh, now=now)
    minutes = (now - T0).total_seconds() / 60
    freshness.handle(db, wh, [purchase(200, 9, [("MILK", "Food", "5000.00")], minutes=minutes)])
    assert rfm.member_scores(wh, 9).r == 5
    assert [e.member_id for e in outbox(db, rfm.GROUP_ENTERED)] == [9]


def test_overview_matrices_member_scores_and_rfm_segments(api: Api, db: Database, wh: Warehouse) -> None:
    worked_example(wh)
    assert ok(api.get("/api/v1/admin/rfm"))["computed_at"] is None
    rfm.recompute(db, wh, now=NOW)
    overview = ok(api.get("/api/v1/admin/rfm"))
    assert overview["members"] == 10 and overview["period_days"] == 365
    groups = {g["code"]: g for g in overview["groups"]}
    assert (groups["lost"]["members"], groups["lost"]["revenue"]) == (2, "1900.00")
    assert groups["best"]["definition"] == "R5 F5 M5"
    matrices = {m["name"]: m for m in overview["matrices"]}
    assert set(matrices) == {"rf", "rm", "fm"} and all(len(m["cells"]) == 25 for m in matrices.values())
    rf = {(c["row"], c["column"]): c for c in matrices["rf"]["cells"]}
    assert (rf[(5, 1)]["members"], rf[(5, 1)]["revenue"]) == (2, "300.00")
    assert sum(c["members"] for c in rf.values()) == 10
    assert matrices["rf"]["row_boundaries"] == ["3", "10", "40", "90"]
    assert matrices["rm"]["column_boundaries"] == ["200.00", "400.00", "600.00", "800.00"]

    member = ok(api.get("/api/v1/admin/rfm/members/3"))
    assert (member["cell"], member["group"], member["monetary"]) == ("R4F1M2", "promising", "300.00")
    assert_error(api.get("/api/v1/admin/rfm/members/99"), 404, "unknown_rfm_member")

    # RFM in segments: cells and named groups.
    load(wh, [registered(n) for n in range(1, 11)])
    assert ok(api.post(f"{SEGMENTS}/count", json={"conditions": {"type": "rfm", "r": [5]}}))["count"] == 2
    lost_or_new = {"type": "rfm", "groups": ["lost", "new"]}
    assert ok(api.post(f"{SEGMENTS}/count", json={"conditions": lost_or_new}))["count"] == 4
    # Segment on the RF matrix's cell R4-5 x F1, restricted to big spenders.
    cell = {"all": [{"type": "rfm", "r": [4, 5], "f": [1]}, {"type": "rfm", "m": [2]}]}
    assert ok(api.post(f"{SEGMENTS}/count", json={"conditions": cell}))["count"] == 2
    # The overview of a segment only.
    segment = ok(api.post(SEGMENTS, json={"name": "recent", "conditions": {"type": "rfm", "r": [5, 4]}}), 201)
    filtered = ok(api.get("/api/v1/admin/rfm", params={"segment_id": segment["id"]}))
    assert filtered["members"] == 4
    assert {g["code"]: g["members"] for g in filtered["groups"]}["promising"] == 2


def test_the_engine_boundaries_are_the_nearest_rank_quintiles(db: Database, wh: Warehouse) -> None:
    rng = random.Random(7)
    events = []
    for n in range(1, 138):
        for k in range(rng.randint(1, 4)):
            cents = rng.randint(100, 99_999)
            events.append(
                purchase(
                    1000 * n + k,
                    n,
                    [("A", None, f"{cents // 100}.{cents % 100:02d}")],
                    minutes=days(rng.randint(0, 300)),
                )
            )
    load(wh, events)
    run = rfm.recompute(db, wh, now=NOW)
    values = rfm.measures(wh, NOW, 365)
    assert run.members == len(values) == 137
    assert run.boundaries.r == rfm.boundaries(values.recency_days)
    assert run.boundaries.f == rfm.boundaries(values.frequency)
    assert [int(v * 100) for v in run.boundaries.m] == rfm.boundaries(values.monetary_cents)
    # The engine's scores are those of the Python scoring used for rescoring.
    bounds = rfm.Bounds.from_json(
        {"r": run.boundaries.r, "f": run.boundaries.f, "m": [str(v) for v in run.boundaries.m]}
    )
    expected = rfm._scored(values, bounds, NOW, 365).to_pylist()
    for row in expected[:40]:
        stored = rfm.member_scores(wh, row["member_id"])
        assert (stored.r, stored.f, stored.m, stored.cell, stored.group) == (
            row["r"],
            row["f"],
            row["m"],
            row["rfm_cell"],
            row["rfm_group"],
        )
