"""The same stream, loaded into DuckDB and into ClickHouse (chdb), in order and shuffled into
batches with repeats, gives the same warehouse: features, timelines, purchases and members."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omniloyal.analytics.service import member_timeline
from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import ChdbWarehouse, Warehouse, open_warehouse
from omniloyal.events.envelope import EventEnvelope
from tests.analytics.helpers import cancelled, linked, merged, purchase, refund, registered, web

MEMBERS = range(1, 21)
CATEGORIES = ["Food/Dairy", "Food/Bakery", "Electronics/TV", "Home", None]


def _stream(seed: int) -> list[EventEnvelope]:
    rng = random.Random(seed)
    events: list[EventEnvelope] = [registered(m, minutes=-5000 + m) for m in MEMBERS]
    for operation in range(1, 91):
        member = rng.choice([*MEMBERS, None])
        lines = [
            (
                f"sku{rng.randint(1, 30)}",
                rng.choice(CATEGORIES),
                f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}",
            )
            for _ in range(rng.randint(1, 4))
        ]
        minutes = rng.randint(0, 5000)
        events.append(
            purchase(
                operation,
                member,
                lines,
                minutes=minutes,
                store=rng.choice(["S1", "S2", "S3", "S4"]),
                channel=rng.choice(["offline", "online_store", "mobile_app"]),
            )
        )
        if member and rng.random() < 0.2:
            events.append(
                refund(10_000 + operation, operation, member, [(1, lines[0][0], lines[0][2])], minutes + 60)
            )
        elif member and rng.random() < 0.1:
            events.append(cancelled(operation, member, minutes + 30))
    for i in range(150):
        visitor = f"anon-{rng.randint(1, 15)}"
        member = rng.choice([None, None, *MEMBERS])
        kind = rng.choice(["page_view", "product_view", "search", "message.opened", "message.clicked"])
        source = "email" if kind.startswith("message.") else rng.choice(["web", "mobile_app"])
        events.append(
            web(
                f"w{i}",
                kind,
                member_id=member,
                anonymous_id=None if member else visitor,
                minutes=rng.randint(0, 5000),
                source=source,
                sku=f"sku{i % 7}",
            )
        )
    for n in range(1, 9):
        events.append(linked(n, f"anon-{n}", minutes=2500 + n))
    events.append(merged(1, 2, minutes=3000))
    events.append(merged(3, 4, minutes=4000))
    return events


def _batches(events: list[EventEnvelope], rng: random.Random) -> Iterator[list[EventEnvelope]]:
    start = 0
    while start < len(events):
        size = rng.randint(1, 60)
        batch = events[start : start + size]
        # At-least-once: some events come again, in this batch or a later one.
        batch += rng.sample(events[: start + size], k=min(3, start + size))
        yield batch
        start += size


def _snapshot(wh: Warehouse) -> dict[str, Any]:
    def rows(sql: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in ("updated_at", "loaded_at")} for r in wh.query(sql)]

    members = sorted({r["member_id"] for r in wh.query("SELECT member_id FROM {member_features}")})
    timelines = {}
    for m in members:
        page = member_timeline(wh, m, limit=500)
        timelines[m] = [(i.id, i.kind, i.occurred_at) for i in page.items]
    return {
        "features": rows("SELECT * FROM {member_features} ORDER BY member_id"),
        "purchases": rows("SELECT * FROM {purchases} ORDER BY operation"),
        "lines": rows("SELECT * FROM {purchase_lines} ORDER BY operation, line"),
        "events": rows("SELECT id, member_id, type FROM {events} ORDER BY id"),
        "links": rows("SELECT anonymous_id, member_id FROM {identity_links} ORDER BY anonymous_id"),
        "timelines": timelines,
    }


@pytest.fixture
def warehouses(tmp_path: Path) -> Iterator[dict[str, Warehouse]]:
    opened = {
        "duckdb_ordered": open_warehouse(f"duckdb:///{tmp_path}/ordered.duckdb"),
        "duckdb": open_warehouse(f"duckdb:///{tmp_path}/shuffled.duckdb"),
        "chdb": open_warehouse(f"chdb://?database=agree_{uuid.uuid4().hex[:10]}"),
    }
    yield opened
    for warehouse in opened.values():
        if isinstance(warehouse, ChdbWarehouse):
            warehouse.drop_database()
        warehouse.close()


def test_duckdb_and_chdb_agree_whatever_the_order(warehouses: dict[str, Warehouse]) -> None:
    events = _stream(seed=7)
    ordered = sorted(events, key=lambda e: e.occurred_at)
    for start in range(0, len(ordered), 100):
        load(warehouses["duckdb_ordered"], ordered[start : start + 100])
    shuffled = list(events)
    random.Random(1).shuffle(shuffled)
    for name in ("duckdb", "chdb"):
        for batch in _batches(shuffled, random.Random(2)):
            load(warehouses[name], batch)
    expected = _snapshot(warehouses["duckdb_ordered"])
    assert len(expected["features"]) >= 15
    assert any(f["refunds_total"] for f in expected["features"])
    for name in ("duckdb", "chdb"):
        got = _snapshot(warehouses[name])
        for part in expected:
            assert got[part] == expected[part], f"{name}: {part} differs"
    # Member snapshots: same on both engines for the same delivery.
    query = "SELECT * FROM {members} ORDER BY member_id"
    strip = ("updated_at",)
    duck = [{k: v for k, v in r.items() if k not in strip} for r in warehouses["duckdb"].query(query)]
    click = [{k: v for k, v in r.items() if k not in strip} for r in warehouses["chdb"].query(query)]
    assert duck == click
