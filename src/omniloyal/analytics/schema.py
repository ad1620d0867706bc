"""The warehouse tables, declared once and rendered as DuckDB DDL, ClickHouse DDL and Arrow schemas.

The same logical tables live on both engines. On ClickHouse every table is a
``ReplacingMergeTree`` ordered by member then time (the shape of the segment and profile
queries: "this member's rows", "members with rows of a kind in a window"); a row is replaced by
a newer version with the same sorting key, and reads use ``FINAL``. On DuckDB the same rows
are kept unique by the sink (delete-then-insert by key inside one transaction).

Column kinds:

========  ====================  ========================  =========================
kind      DuckDB                ClickHouse                Arrow
========  ====================  ========================  =========================
str       VARCHAR               String                    string
int       BIGINT                Int64                     int64
int32     INTEGER               Int32                     int32
money     DECIMAL(18,2)         Decimal(18, 2)            decimal128(18, 2)
qty       DECIMAL(18,3)         Decimal(18, 3)            decimal128(18, 3)
time      TIMESTAMPTZ           DateTime64(6, 'UTC')      timestamp[us, UTC]
date      DATE                  Date32                    date32
bool      BOOLEAN               Bool                      bool
json      VARCHAR (JSON text)   String                    string
strs      VARCHAR[]             Array(String)             list<string>
========  ====================  ========================  =========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

# ClickHouse only: a hidden column (MATERIALIZED, so ``SELECT *`` leaves it out) marking a row
# version as deleted; ``ReplacingMergeTree(version, _deleted)`` then hides the key under FINAL.
DELETED_COLUMN = "_deleted"


Kind = Literal["str", "int", "int32", "money", "qty", "time", "date", "bool", "json", "strs"]

_DUCKDB = {
    "str": "VARCHAR",
    "int": "BIGINT",
    "int32": "INTEGER",
    "money": "DECIMAL(18,2)",
    "qty": "DECIMAL(18,3)",
    "time": "TIMESTAMPTZ",
    "date": "DATE",
    "bool": "BOOLEAN",
    "json": "VARCHAR",
    "strs": "VARCHAR[]",
}
_CLICKHOUSE = {
    "str": "String",
    "int": "Int64",
    "int32": "Int32",
    "money": "Decimal(18, 2)",
    "qty": "Decimal(18, 3)",
    "time": "DateTime64(6, 'UTC')",
    "date": "Date32",
    "bool": "Bool",
    "json": "String",
    "strs": "Array(String)",
}
_ARROW: dict[str, pa.DataType] = {
    "str": pa.string(),
    "int": pa.int64(),
    "int32": pa.int32(),
    "money": pa.decimal128(18, 2),
    "qty": pa.decimal128(18, 3),
    "time": pa.timestamp("us", tz="UTC"),
    "date": pa.date32(),
    "bool": pa.bool_(),
    "json": pa.string(),
    "strs": pa.list_(pa.string()),
}


def quote(name: str) -> str:
    """An identifier quoted the way both engines read it (so ``at`` or ``order`` are fine)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    nullable: bool = False
    # ClickHouse LowCardinality: for codes with few distinct values (type, source, store, channel).
    low_cardinality: bool = False

    def duckdb(self) -> str:
        return f"{quote(self.name)} {_DUCKDB[self.kind]}" + ("" if self.nullable else " NOT NULL")

    def clickhouse(self) -> str:
        ch = _CLICKHOUSE[self.kind]
        if self.nullable:
            ch = f"Nullable({ch})"
        if self.low_cardinality:
            ch = f"LowCardinality({ch})"
        return f"{quote(self.name)} {ch}"

    def arrow(self) -> pa.Field:
        return pa.field(self.name, _ARROW[self.kind], nullable=self.nullable or self.kind == "strs")


@dataclass(frozen=True)
class TableDef:
    name: str
    columns: tuple[Column, ...]
    # Identity of a row: the sink replaces rows by this key (DuckDB delete + insert).
    key: tuple[str, ...]
    # ClickHouse: the version column of ReplacingMergeTree, the sorting key, the partition.
    version: str
    order_by: tuple[str, ...]
    partition_by: str | None = None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([c.arrow() for c in self.columns])

    def duckdb_ddl(self) -> str:
        cols = ",\n  ".join(c.duckdb() for c in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {cols}\n)"

    def duckdb_add_column(self, column: Column) -> str:
        # Added later: nullable (existing rows have no value), whatever the declaration says.
        return f"ALTER TABLE {self.name} ADD COLUMN IF NOT EXISTS {quote(column.name)} {_DUCKDB[column.kind]}"

    def clickhouse_add_column(self, database: str, column: Column) -> str:
        return f"ALTER TABLE {database}.{self.name} ADD COLUMN IF NOT EXISTS {column.clickhouse()}"

    def clickhouse_ddl(self, database: str) -> str:
        cols = ",\n  ".join(
            [*(c.clickhouse() for c in self.columns), f"{DELETED_COLUMN} UInt8 MATERIALIZED 0"]
        )
        nullable_key = any(self.column(k).nullable for k in self.order_by)
        parts = [
            f"CREATE TABLE IF NOT EXISTS {database}.{self.name} (\n  {cols}\n)",
            f"ENGINE = ReplacingMergeTree({quote(self.version)}, {DELETED_COLUMN})",
        ]
        if self.partition_by:
            parts.append(f"PARTITION BY {self.partition_by}")
        parts.append(f"ORDER BY ({', '.join(quote(k) for k in self.order_by)})")
        if nullable_key:
            parts.append("SETTINGS allow_nullable_key = 1")
        return "\n".join(parts)


def _s(name: str, *, null: bool = True, lc: bool = False) -> Column:
    return Column(name, "str", nullable=null, low_cardinality=lc)


def _t(name: str, *, null: bool = False) -> Column:
    return Column(name, "time", nullable=null)


def _m(name: str) -> Column:
    return Column(name, "money")


UTM_COLUMNS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")

EVENTS = TableDef(
    "events",
    (
        _s("id", null=False),
        _s("type", null=False, lc=True),
        _t("occurred_at"),
        _t("received_at"),
        Column("member_id", "int", nullable=True),
        _s("anonymous_id"),
        _s("source", lc=True),
        _s("store", lc=True),
        # Properties the segment conditions filter on most, promoted to columns.
        _s("sku"),
        _s("category"),
        _s("section"),
        _s("campaign"),
        Column("properties", "json"),
        *(_s(name, lc=True) for name in UTM_COLUMNS),
        _t("loaded_at"),
    ),
    key=("id",),
    version="loaded_at",
    order_by=("member_id", "occurred_at", "id"),
    partition_by="toYYYYMM(occurred_at)",
)

PURCHASES = TableDef(
    "purchases",
    (
        _s("operation", null=False),
        _s("operation_id"),
        _s("event_id", null=False),
        Column("member_id", "int", nullable=True),
        _s("store", lc=True),
        _s("channel", null=False, lc=True),
        _s("kind", null=False, lc=True),
        _s("source", null=False, lc=True),
        _s("cheque_number"),
        _t("cheque_at"),
        _m("amount"),
        _m("discount"),
        _m("paid"),
        _m("points_accrued"),
        _m("points_written_off"),
        Column("accrual", "json"),
        Column("write_off", "json"),
        Column("payments", "json"),
        _m("refunded"),
        _s("status", null=False, lc=True),
        _t("cancelled_at", null=True),
        _t("updated_at"),
    ),
    key=("operation",),
    version="updated_at",
    order_by=("member_id", "cheque_at", "operation"),
    partition_by="toYYYYMM(cheque_at)",
)

PURCHASE_LINES = TableDef(
    "purchase_lines",
    (
        _s("operation", null=False),
        Column("line", "int32"),
        Column("member_id", "int", nullable=True),
        _s("sku", null=False),
        _s("category"),
        _s("store", lc=True),
        _s("channel", null=False, lc=True),
        _t("cheque_at"),
        _m("price"),
        Column("quantity", "qty"),
        _m("amount"),
        _m("discount"),
        Column("refunded_quantity", "qty"),
        _m("refunded_amount"),
        _s("status", null=False, lc=True),
        _t("updated_at"),
    ),
    key=("operation", "line"),
    version="updated_at",
    order_by=("member_id", "cheque_at", "operation", "line"),
    partition_by="toYYYYMM(cheque_at)",
)

# Refunds (one row per refunded line, line 0 for a refund without lines) and cancellations of
# purchases: the refunded amounts on purchases and lines are recomputed from these rows, so a
# refund applied twice, or before its purchase arrived, still counts once.
PURCHASE_ADJUSTMENTS = TableDef(
    "purchase_adjustments",
    (
        _s("purchase_operation", null=False),
        _s("operation", null=False),
        _s("kind", null=False, lc=True),
        Column("line", "int32"),
        Column("member_id", "int", nullable=True),
        _s("sku"),
        Column("quantity", "qty"),
        _m("amount"),
        _t("adjusted_at"),
        _s("event_id", null=False),
        _t("updated_at"),
    ),
    key=("purchase_operation", "operation", "line"),
    version="updated_at",
    order_by=("purchase_operation", "operation", "line"),
)

CONSENT_CHANNELS = ("email", "sms", "viber", "push")

MEMBERS = TableDef(
    "members",
    (
        Column("member_id", "int"),
        _s("external_id"),
        _s("status", null=False, lc=True),
        _s("first_name"),
        _s("last_name"),
        _s("middle_name"),
        _s("gender", lc=True),
        Column("birth_date", "date", nullable=True),
        _s("city", lc=True),
        _s("phone"),
        _s("email"),
        Column("children", "json"),
        Column("pets", "strs"),
        Column("preferred_categories", "strs"),
        Column("attributes", "json"),
        Column("consents", "json"),
        *(Column(f"consent_{c}", "bool", nullable=True) for c in CONSENT_CHANNELS),
        # When the member registered (the questionnaire's created_at).
        _t("created_at", null=True),
        Column("merged_into", "int", nullable=True),
        # Time of the newest event the snapshot reflects: an older event arriving late is ignored.
        _t("snapshot_at"),
        _t("updated_at"),
    ),
    key=("member_id",),
    version="updated_at",
    order_by=("member_id",),
)

IDENTITY_LINKS = TableDef(
    "identity_links",
    (
        _s("anonymous_id", null=False),
        Column("member_id", "int"),
        _t("linked_at"),
        _s("event_id", null=False),
        _t("updated_at"),
    ),
    key=("anonymous_id",),
    version="updated_at",
    order_by=("anonymous_id",),
)

MEMBER_FEATURES = TableDef(
    "member_features",
    (
        Column("member_id", "int"),
        Column("purchases_count", "int"),
        _m("purchases_total"),
        _m("refunds_total"),
        _m("ltv"),
        Column("avg_cheque", "money", nullable=True),
        _t("first_purchase_at", null=True),
        _t("last_purchase_at", null=True),
        Column("favourite_categories", "strs"),
        Column("favourite_stores", "strs"),
        Column("channels", "strs"),
        # Channels seen in events other than purchases (web, mobile_app, contact_center...).
        Column("activity_channels", "strs"),
        _t("last_site_visit_at", null=True),
        _t("last_app_visit_at", null=True),
        _t("last_message_opened_at", null=True),
        _t("last_message_clicked_at", null=True),
        _t("last_activity_at", null=True),
        _t("updated_at"),
        # The running sums the favourites are ranked from ({"stores": {code: spend}, "categories":
        # {path: spend}, "channels": [...]}, spend net of refunds): a new purchase is added to
        # them instead of recomputing the member's history. Null: not known, recompute.
        Column("purchase_spend", "json", nullable=True),
    ),
    key=("member_id",),
    version="updated_at",
    order_by=("member_id",),
)

TABLES: dict[str, TableDef] = {
    t.name: t
    for t in (
        EVENTS,
        PURCHASES,
        PURCHASE_LINES,
        PURCHASE_ADJUSTMENTS,
        MEMBERS,
        IDENTITY_LINKS,
        MEMBER_FEATURES,
    )
}


def register_table(definition: TableDef) -> TableDef:
    """Adds a table of another package (segments, RFM...) to the warehouse: ``ensure_schema``
    creates it on both engines and SQL templates may name it as ``{name}``."""
    TABLES[definition.name] = definition
    return definition
