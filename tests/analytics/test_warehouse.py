"""The warehouse layer on both engines: literals, upsert/update/rewrite/delete, schema, URLs."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from omniloyal.analytics import schema
from omniloyal.analytics.warehouse import Warehouse, WarehouseError, open_warehouse

NOW = datetime(2026, 5, 1, 10, 30, 15, 123456, tzinfo=UTC)


def _link(anonymous_id: str, member_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "anonymous_id": anonymous_id,
        "member_id": member_id,
        "linked_at": NOW,
        "event_id": f"e-{anonymous_id}",
        "updated_at": datetime.now(UTC),
        **extra,
    }


def test_literals_round_trip(wh: Warehouse) -> None:
    values = {
        "s": "it's a \\ back'slash \"quoted\" Ёлка {braces} $dollar",
        "d": Decimal("12.345"),
        "t": NOW,
        "day": date(1990, 5, 17),
        "n": None,
        "i": -42,
        "b": True,
    }
    row = wh.query("SELECT $s AS s, $d AS d, $t AS t, $day AS day, $n AS n, $i AS i, $b AS b", values)[0]
    assert row == values
    assert wh.scalar("SELECT count(*) FROM {events} WHERE id IN $ids", {"ids": ["a'b", "c"]}) == 0
    assert wh.scalar("SELECT count(*) FROM {events} WHERE id IN $ids", {"ids": []}) == 0


def test_upsert_update_rewrite_delete(wh: Warehouse) -> None:
    wh.upsert("identity_links", [_link("a", 1), _link("b", 1), _link("c", 2)])
    wh.upsert("identity_links", [_link("a", 3)])
    rows = wh.query("SELECT anonymous_id, member_id FROM {identity_links} ORDER BY anonymous_id")
    assert [(r["anonymous_id"], r["member_id"]) for r in rows] == [("a", 3), ("b", 1), ("c", 2)]
    wh.update("identity_links", [{"anonymous_id": "b", "event_id": "changed"}], ["event_id"])
    assert wh.scalar("SELECT event_id FROM {identity_links} WHERE anonymous_id = 'b'") == "changed"
    moved = wh.rewrite(
        "identity_links",
        "member_id = $m",
        {"m": 2},
        lambda rows: [{**r, "member_id": 9, "updated_at": datetime.now(UTC)} for r in rows],
    )
    assert moved == 1
    wh.delete("identity_links", "member_id = $m", {"m": 3})
    rows = wh.query("SELECT anonymous_id, member_id FROM {identity_links} ORDER BY anonymous_id")
    assert [(r["anonymous_id"], r["member_id"]) for r in rows] == [("b", 1), ("c", 9)]


def test_ensure_schema_adds_new_columns_and_registered_tables(
    wh: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    links = schema.TABLES["identity_links"]
    wider = dataclasses.replace(links, columns=(*links.columns, schema.Column("note", "str", nullable=True)))
    extra = schema.TableDef(
        "segment_members",
        (schema.Column("segment_id", "int"), schema.Column("member_id", "int"), schema.Column("at", "time")),
        key=("segment_id", "member_id"),
        version="at",
        order_by=("segment_id", "member_id"),
    )
    monkeypatch.setitem(schema.TABLES, "identity_links", wider)
    monkeypatch.setitem(schema.TABLES, "segment_members", extra)
    wh.ensure_schema()
    wh.upsert("identity_links", [_link("x", 1, note="hello")])
    assert wh.scalar("SELECT note FROM {identity_links} WHERE anonymous_id = 'x'") == "hello"
    wh.insert("segment_members", [{"segment_id": 1, "member_id": 5, "at": NOW}])
    assert wh.scalar("SELECT count(*) FROM {segment_members}") == 1


def test_warehouse_urls(tmp_path: Path) -> None:
    with pytest.raises(WarehouseError):
        open_warehouse("postgres://nope")
    with pytest.raises(WarehouseError):
        open_warehouse("chdb://?database=bad-name")
    memory = open_warehouse("duckdb:///:memory:")
    assert memory.scalar("SELECT count(*) FROM {events}") == 0
    memory.close()
    nested = tmp_path / "a" / "b" / "wh.duckdb"
    open_warehouse(f"duckdb:///{nested}").close()
    assert nested.exists()
    # One embedded ClickHouse per process: another path is refused with a clear error.
    open_warehouse("chdb://?database=urls_probe").execute("DROP DATABASE IF EXISTS urls_probe")
    with pytest.raises(WarehouseError, match="one chdb path"):
        open_warehouse(f"chdb:///{tmp_path}/other-chdb")


def test_insert_accepts_arrow_rows_and_columns(wh: Warehouse) -> None:
    import pyarrow as pa

    as_rows = [_link("r1", 1)]
    as_columns = {k: [v] for k, v in _link("c1", 2).items()}
    as_arrow = pa.Table.from_pylist([_link("a1", 3)])
    assert wh.insert("identity_links", as_rows) == 1
    assert wh.insert("identity_links", as_columns) == 1
    assert wh.insert("identity_links", as_arrow) == 1
    rows = wh.query(
        "SELECT anonymous_id, member_id FROM {identity_links} WHERE anonymous_id IN (SELECT a FROM {x})",
        data={"x": {"a": ["r1", "c1", "a1", "zz"]}},
    )
    assert sorted((r["anonymous_id"], r["member_id"]) for r in rows) == [("a1", 3), ("c1", 2), ("r1", 1)]


def test_rows_come_back_exact_aware_and_null_where_nothing_is(wh: Warehouse) -> None:
    # Times and decimals are converted in bulk: the values must be the ones stored, to the
    # microsecond and the cent, before 1970 as after, with NULLs as None.
    early = datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC)
    wh.insert("identity_links", [_link("a", 1, linked_at=early), _link("b", 2)])
    rows = wh.query("SELECT anonymous_id, linked_at FROM {identity_links} ORDER BY anonymous_id")
    assert [r["linked_at"] for r in rows] == [early, NOW]
    assert all(r["linked_at"].utcoffset() == timedelta(0) for r in rows)
    row = wh.query(
        "SELECT $d AS d, $z AS z, $neg AS neg, $t AS t, $n AS n",
        {
            "d": Decimal("123456789012345.67"),
            "z": Decimal("0.00"),
            "neg": Decimal("-0.05"),
            "t": NOW,
            "n": None,
        },
    )[0]
    assert row == {
        "d": Decimal("123456789012345.67"),
        "z": Decimal("0.00"),
        "neg": Decimal("-0.05"),
        "t": NOW,
        "n": None,
    }
    assert str(row["z"]) == "0.00"
