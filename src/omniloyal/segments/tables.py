"""The segments' own warehouse tables, declared with the warehouse's ``Column``/``TableDef``.

* ``segment_members``: current membership of every materialised segment (who, since when);
* ``segment_changes``: every entry and exit, with its time and cause (the membership history);
* ``rfm_scores``: R, F, M scores, cell and named group per member (``segments.rfm``);
* ``member_loyalty``, ``member_balances``, ``member_cards``, ``audience_members``: the loyalty
  side's facts segments filter on (contact quality, balances per currency, card states, target
  audience membership), mirrored from the operational store by ``segments.loyalty``.

Same engines as the warehouse tables: DuckDB (rows kept unique by key: delete then insert in
one transaction) and ClickHouse (``ReplacingMergeTree`` ordered by the key, read with
``FINAL``, deletions written as tombstone versions).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from omniloyal.analytics.schema import DELETED_COLUMN, Column, TableDef
from omniloyal.analytics.warehouse import Warehouse


def _table(
    name: str, columns: tuple[Column, ...], key: tuple[str, ...], version: str = "updated_at"
) -> TableDef:
    return TableDef(name, columns, key=key, version=version, order_by=key)


SEGMENT_MEMBERS = _table(
    "segment_members",
    (
        Column("segment_id", "int"),
        Column("member_id", "int"),
        Column("entered_at", "time"),
        Column("updated_at", "time"),
    ),
    ("segment_id", "member_id"),
)

SEGMENT_CHANGES = _table(
    "segment_changes",
    (
        Column("segment_id", "int"),
        Column("changed_at", "time"),
        Column("member_id", "int"),
        # entered | left
        Column("change", "str", low_cardinality=True),
        # materialise | events | rfm
        Column("cause", "str", low_cardinality=True),
        Column("updated_at", "time"),
    ),
    ("segment_id", "changed_at", "member_id", "change"),
)

RFM_SCORES = _table(
    "rfm_scores",
    (
        Column("member_id", "int"),
        Column("recency_days", "int"),
        Column("frequency", "int"),
        Column("monetary", "money"),
        Column("last_purchase_at", "time"),
        Column("r", "int32"),
        Column("f", "int32"),
        Column("m", "int32"),
        Column("rfm_cell", "str", low_cardinality=True),
        Column("rfm_group", "str", low_cardinality=True),
        Column("period_days", "int32"),
        Column("computed_at", "time"),
        Column("updated_at", "time"),
    ),
    ("member_id",),
)

# Staging of an RFM recompute: the per-member measures, scored in the engine.
RFM_MEASURES = _table(
    "rfm_measures",
    (
        Column("member_id", "int"),
        Column("recency_days", "int"),
        Column("frequency", "int"),
        Column("monetary", "money"),
        Column("last_purchase_at", "time"),
        Column("updated_at", "time"),
    ),
    ("member_id",),
)

MEMBER_LOYALTY = _table(
    "member_loyalty",
    (
        Column("member_id", "int"),
        Column("status", "str", low_cardinality=True),
        Column("phone_valid", "bool"),
        Column("phone_mobile", "bool"),
        Column("email_valid", "bool"),
        Column("updated_at", "time"),
    ),
    ("member_id",),
)

MEMBER_BALANCES = _table(
    "member_balances",
    (
        Column("member_id", "int"),
        Column("currency", "str", low_cardinality=True),
        Column("balance", "money"),
        Column("updated_at", "time"),
    ),
    ("member_id", "currency"),
)

MEMBER_CARDS = _table(
    "member_cards",
    (
        Column("member_id", "int"),
        Column("card", "str"),
        Column("state", "str", low_cardinality=True),
        Column("blocked", "bool"),
        Column("updated_at", "time"),
    ),
    ("member_id", "card"),
)

AUDIENCE_MEMBERS = _table(
    "audience_members",
    (
        Column("audience", "str", low_cardinality=True),
        Column("member_id", "int"),
        Column("updated_at", "time"),
    ),
    ("audience", "member_id"),
)

SEGMENT_TABLES: dict[str, TableDef] = {
    t.name: t
    for t in (
        SEGMENT_MEMBERS,
        SEGMENT_CHANGES,
        RFM_SCORES,
        RFM_MEASURES,
        MEMBER_LOYALTY,
        MEMBER_BALANCES,
        MEMBER_CARDS,
        AUDIENCE_MEMBERS,
    )
}

_ready: weakref.WeakSet[Warehouse] = weakref.WeakSet()


def database(wh: Warehouse) -> str | None:
    """The ClickHouse database of ``wh`` (None on DuckDB)."""
    value = getattr(wh, "database", None)
    return str(value) if wh.dialect == "clickhouse" and value else None


def ensure(wh: Warehouse) -> None:
    """Creates the tables (once per warehouse instance; ``CREATE ... IF NOT EXISTS``)."""
    if wh in _ready:
        return
    with wh.write_lock:
        for table in SEGMENT_TABLES.values():
            if wh.dialect == "clickhouse":
                wh.execute(_escape(table.clickhouse_ddl(str(database(wh)))))
            else:
                wh.execute(_escape(table.duckdb_ddl()))
        _ready.add(wh)


def forget(wh: Warehouse) -> None:
    _ready.discard(wh)


def qualified(wh: Warehouse, name: str) -> str:
    return wh.qualified(name)


def ref(wh: Warehouse, name: str, alias: str = "") -> str:
    """``name`` for reading: ``db.name AS alias FINAL`` on ClickHouse."""
    text = wh.qualified(name) + (f" AS {alias}" if alias else "")
    return text + (" FINAL" if wh.dialect == "clickhouse" else "")


def _escape(sql: str) -> str:
    """SQL text passed through ``Warehouse.render`` unchanged (it formats ``{...}``)."""
    return sql.replace("{", "{{").replace("}", "}}") if "{" in sql else sql


def escape(sql: str) -> str:
    return _escape(sql)


def to_arrow(table: TableDef, data: pa.Table | Sequence[Mapping[str, Any]]) -> pa.Table:
    if isinstance(data, pa.Table):
        return data.select(table.column_names).cast(table.arrow_schema)
    return pa.Table.from_pylist([dict(r) for r in data], schema=table.arrow_schema)


def insert(
    wh: Warehouse, name: str, data: pa.Table | Sequence[Mapping[str, Any]], *, deleted: bool = False
) -> int:
    table = SEGMENT_TABLES[name]
    arrow = to_arrow(table, data)
    if not arrow.num_rows:
        return 0
    columns = list(arrow.column_names)
    settings = ""
    if deleted:
        arrow = arrow.append_column(DELETED_COLUMN, pa.array([1] * arrow.num_rows, pa.uint8()))
        columns.append(DELETED_COLUMN)
        settings = " SETTINGS insert_allow_materialized_columns = 1"
    names = ", ".join(columns)
    wh.execute(
        f"INSERT INTO {wh.qualified(name)} ({names}) SELECT {names} FROM {{rows}}{settings}",
        data={"rows": arrow},
    )
    return arrow.num_rows


def _key_match(table: TableDef, alias: str) -> str:
    return " AND ".join(f"{table.name}.{k} = {alias}.{k}" for k in table.key)


def upsert(wh: Warehouse, name: str, data: pa.Table | Sequence[Mapping[str, Any]]) -> int:
    """Inserts rows, replacing those with the same key."""
    table = SEGMENT_TABLES[name]
    arrow = to_arrow(table, data)
    if not arrow.num_rows:
        return 0
    if wh.dialect == "clickhouse":
        return insert(wh, name, arrow)
    with wh.transaction():
        keys = arrow.select(list(table.key))
        wh.execute(
            f"DELETE FROM {name} USING {{keys}} AS k WHERE {_key_match(table, 'k')}",
            data={"keys": keys},
        )
        insert(wh, name, arrow)
    return arrow.num_rows


def delete_keys(wh: Warehouse, name: str, keys: pa.Table | Sequence[Mapping[str, Any]]) -> None:
    """Removes the rows with these keys (absent keys are ignored)."""
    table = SEGMENT_TABLES[name]
    if not isinstance(keys, pa.Table):
        if not keys:
            return
        schema = pa.schema([table.column(k).arrow() for k in table.key])
        keys = pa.Table.from_pylist([{k: r[k] for k in table.key} for r in keys], schema=schema)
    if not keys.num_rows:
        return
    if wh.dialect != "clickhouse":
        wh.execute(
            f"DELETE FROM {name} USING {{keys}} AS k WHERE {_key_match(table, 'k')}",
            data={"keys": keys},
        )
        return
    names = ", ".join(table.key)
    current = wh.query_arrow(
        f"SELECT * FROM {ref(wh, name)} WHERE ({names}) IN (SELECT {names} FROM {{keys}})",
        data={"keys": keys},
    )
    tombstones(wh, name, current)


def delete_where(wh: Warehouse, name: str, where: str) -> None:
    """Removes the rows matching ``where`` (SQL over the table's columns, already escaped)."""
    if wh.dialect != "clickhouse":
        wh.execute(f"DELETE FROM {name} WHERE {where}")
        return
    tombstones(wh, name, wh.query_arrow(f"SELECT * FROM {ref(wh, name)} WHERE {where}"))


def tombstones(wh: Warehouse, name: str, rows: pa.Table) -> None:
    """ClickHouse: newer versions of ``rows`` marked deleted (FINAL then hides their keys)."""
    if not rows.num_rows:
        return
    table = SEGMENT_TABLES[name]
    now = datetime.now(UTC)
    versions = rows.column(table.version).to_pylist()
    step = timedelta(microseconds=1)
    newer = [max(now, v + step) if v is not None else now for v in versions]
    rows = rows.set_column(
        rows.column_names.index(table.version), table.version, pa.array(newer, pa.timestamp("us", tz="UTC"))
    )
    insert(wh, name, rows, deleted=True)


def truncate(wh: Warehouse) -> None:
    """Empties the segments' tables (tests, benchmarks)."""
    for name in SEGMENT_TABLES:
        if wh.dialect == "clickhouse":
            wh.execute(f"TRUNCATE TABLE {wh.qualified(name)}")
        else:
            wh.execute(f"DELETE FROM {name}")


def replace_where(wh: Warehouse, name: str, where: str, data: pa.Table | Sequence[Mapping[str, Any]]) -> int:
    """The rows matching ``where`` become exactly ``data`` (whose rows must match ``where``).

    On ClickHouse only the keys that disappear get tombstones; the others are replaced by the
    new rows' newer versions (``data`` carries a version newer than what is stored)."""
    table = SEGMENT_TABLES[name]
    arrow = to_arrow(table, data)
    if wh.dialect != "clickhouse":
        with wh.transaction():
            wh.execute(f"DELETE FROM {name} WHERE {where}")
            insert(wh, name, arrow)
        return arrow.num_rows
    current = wh.query_arrow(f"SELECT * FROM {ref(wh, name)} WHERE {where}")
    keep = {tuple(r[k] for k in table.key) for r in arrow.select(list(table.key)).to_pylist()}
    gone = [r for r in current.to_pylist() if tuple(r[k] for k in table.key) not in keep]
    insert(wh, name, arrow)
    if gone:
        tombstones(wh, name, to_arrow(table, gone))
    return arrow.num_rows
