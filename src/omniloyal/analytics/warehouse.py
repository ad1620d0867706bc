"""The analytical warehouse: one interface over DuckDB (embedded) and ClickHouse (production).

Chosen by ``OMNILOYAL_WAREHOUSE_URL``:

* ``duckdb:///./data/warehouse.duckdb`` (the default), ``duckdb:////abs/path.duckdb``,
  ``duckdb:///:memory:``;
* ``chdb:///path/to/dir`` or ``chdb://`` (a temporary directory): ClickHouse SQL in-process
  (chdb). One embedded ClickHouse server exists per process, bound to the first path opened;
  every ``chdb`` warehouse of the process shares it, each in its own database
  (``?database=name``, default ``omniloyal``);
* ``clickhouse://user:password@host:8123/database``: a ClickHouse server through
  ``clickhouse-connect`` (the ``clickhouse`` extra).

SQL is written once in the subset both engines share and rendered per engine:

* ``{events}`` is a table reference: ``events`` on DuckDB, ``db.events FINAL`` on ClickHouse
  (reads see only the newest version of each row); ``{events:e}`` adds the alias ``e``;
* ``{batch}`` names an Arrow table passed in ``data={"batch": table}``;
* ``$name`` is a parameter, rendered as a literal of the engine (values are escaped, never
  concatenated raw).

Writers in one process are serialised by :attr:`Warehouse.write_lock`; readers on DuckDB use a
cursor per thread and never wait for them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import re
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa

from omniloyal.analytics.schema import DELETED_COLUMN, TABLES, Column, TableDef, quote
from omniloyal.kernel.errors import AppError

Rows = list[dict[str, Any]]
# What bulk calls take: an Arrow table, rows as dicts, or columns as lists ({"id": [...], ...}).
Data: TypeAlias = "pa.Table | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]"

_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WarehouseError(AppError):
    """A warehouse that cannot be opened as configured."""

    def __init__(self, message: str) -> None:
        super().__init__("warehouse_unavailable", message, status_code=503)


def _arrow_of(value: Data, schema: pa.Schema | None = None) -> pa.Table:
    if isinstance(value, pa.Table):
        return value if schema is None else value.select(schema.names).cast(schema)
    if isinstance(value, Mapping):
        if schema is None:
            return pa.table(dict(value))
        return pa.table({name: pa.array(value[name], type=schema.field(name).type) for name in schema.names})
    return pa.Table.from_pylist([dict(r) for r in value], schema=schema)


# What pyarrow gives for a UTC timestamp (its tzinfo object, so rows compare and print the same).
_UTC_EPOCH = pa.scalar(0, type=pa.timestamp("us", tz="UTC")).as_py()


def _values(column: pa.ChunkedArray) -> list[Any]:
    """A column as Python values, as ``to_pylist`` gives them. UTC timestamps and decimals are
    converted here: pyarrow builds each aware datetime through the time zone (about 5 us a
    value, the bulk of reading a row of features) and each Decimal slower than from its text."""
    kind = column.type
    if column.null_count == len(column):  # e.g. the visit times of members who never came
        return [None] * len(column)
    if pa.types.is_timestamp(kind) and kind.unit == "us" and kind.tz == "UTC":
        epoch, step = _UTC_EPOCH, timedelta
        return [
            None if v is None else epoch + step(microseconds=v) for v in column.cast(pa.int64()).to_pylist()
        ]
    if pa.types.is_decimal(kind):
        return [None if v is None else Decimal(v) for v in column.cast(pa.string()).to_pylist()]
    values: list[Any] = column.to_pylist()
    return values


def rows_of(table: pa.Table) -> Rows:
    """An Arrow table as rows (dicts): Decimal, aware UTC datetimes, lists, None for NULL."""
    names = table.column_names
    columns = [_values(table.column(i)) for i in range(table.num_columns)]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("warehouse times must be timezone-aware")
    return value.astimezone(UTC)


class _Ref:
    """A table reference that renders ``{name}`` and ``{name:alias}`` in SQL templates."""

    def __init__(self, base: str, suffix: str = "") -> None:
        self.base = base
        self.suffix = suffix

    def __format__(self, alias: str) -> str:
        return f"{self.base}{f' AS {alias}' if alias else ''}{self.suffix}"


class RecentKeys:
    """Keys of rows this process wrote to a table lately and saw committed: bounded, the
    oldest forgotten first. Only ever a subset of what the table holds, so "in here" means
    "stored" (the sink skips the warehouse lookup for them); whatever empties the table
    clears it."""

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    @property
    def keys(self) -> Container[Hashable]:
        """The keys, for fast membership tests (read only)."""
        return self._keys.keys()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, keys: Iterable[Hashable]) -> None:
        with self._lock:
            known = self._keys
            for key in keys:
                known[key] = None
            while len(known) > self.capacity:
                known.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


class Warehouse(ABC):
    """Common behaviour; subclasses run SQL and move Arrow tables."""

    dialect: str

    def __init__(self, url: str) -> None:
        self.url = url
        self.write_lock = threading.RLock()
        # Events this process loaded, as (id, occurred_at) (``analytics.sink``): a batch
        # delivered to several consumers that all load it (the sink and the segments consumer)
        # is looked up once.
        self.loaded_events = RecentKeys()

    # ------------------------------------------------------------- rendering

    @abstractmethod
    def qualified(self, table: str) -> str:
        """The table's name for INSERT/DELETE/DDL."""

    def ref(self, table: str) -> _Ref:
        return _Ref(self.qualified(table))

    def lit(self, value: Any) -> str:
        """``value`` as a SQL literal of this engine."""
        if value is None:
            return "NULL"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, Decimal):
            return self._decimal(value)
        if isinstance(value, datetime):
            return self._timestamp(_utc(value))
        if isinstance(value, date):
            return self._date(value)
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, list | tuple | set | frozenset):
            items = sorted(value, key=repr) if isinstance(value, set | frozenset) else list(value)
            return "(" + (", ".join(self.lit(v) for v in items) or "NULL") + ")"
        raise TypeError(f"no SQL literal for {type(value).__name__}")

    @abstractmethod
    def _string(self, value: str) -> str: ...

    @abstractmethod
    def _decimal(self, value: Decimal) -> str: ...

    @abstractmethod
    def _timestamp(self, value: datetime) -> str: ...

    @abstractmethod
    def _date(self, value: date) -> str: ...

    def render(
        self, sql: str, params: Mapping[str, Any] | None = None, data_refs: Mapping[str, str] | None = None
    ) -> str:
        """The SQL of this engine: ``{table}`` references, ``{data}`` references (as given in
        ``data_refs``), ``$param`` literals."""
        refs: dict[str, Any] = {name: self.ref(name) for name in TABLES}
        refs.update(data_refs or {})
        text = sql.format_map(refs) if "{" in sql else sql
        if params:

            def literal(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in params:
                    raise KeyError(f"SQL parameter ${name} not given")
                return self.lit(params[name])

            text = _PARAM.sub(literal, text)
        return text

    # ------------------------------------------------------------- running

    @abstractmethod
    def execute(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> None:
        """Run a statement (DDL, INSERT ... SELECT, DELETE)."""

    @abstractmethod
    def query_arrow(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> pa.Table: ...

    def query(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> Rows:
        """Rows as dicts: Decimal, aware UTC datetimes, lists, None for NULL."""
        return rows_of(self.query_arrow(sql, params, data=data))

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        table = self.query_arrow(sql, params)
        return table.column(0)[0].as_py() if table.num_rows else None

    def to_arrow(self, table: str, data: Data) -> pa.Table:
        """Rows, columns or an Arrow table as an Arrow table of ``table``'s columns and types."""
        return _arrow_of(data, TABLES[table].arrow_schema)

    def insert(self, table: str, data: Data) -> int:
        """Bulk insert of whole rows (Arrow table or dicts)."""
        arrow = self.to_arrow(table, data)
        if arrow.num_rows:
            self._insert_arrow(table, arrow)
        return arrow.num_rows

    @abstractmethod
    def _insert_arrow(self, table: str, arrow: pa.Table) -> None: ...

    @abstractmethod
    def upsert(self, table: str, data: Data) -> int:
        """Insert rows, replacing those with the same key (the table's ``key``).

        The sorting-key columns of a row (member, time) must not change: that is a
        :meth:`rewrite`."""

    def rewrite(
        self, table: str, where: str, params: Mapping[str, Any], transform: Callable[[Rows], Rows]
    ) -> int:
        """Replace the rows matching ``where`` by ``transform(rows)``.

        Used to re-key rows (a merged member, a linked anonymous visitor). ``transform`` must
        return rows that no longer match ``where``; then a repeat after a crash halfway is
        harmless on ClickHouse too (the new rows are written before the old ones are removed).
        """
        rows = self.query(f"SELECT * FROM {{{table}}} WHERE {where}", params)
        if not rows:
            return 0
        new_rows = transform([dict(r) for r in rows])
        self._replace(table, where, params, rows, new_rows)
        return len(rows)

    @abstractmethod
    def _replace(
        self, table: str, where: str, params: Mapping[str, Any], old_rows: Rows, new_rows: Rows
    ) -> None: ...

    def _changes(self, table: str, rows: Rows, columns: Sequence[str]) -> pa.Table:
        definition = TABLES[table]
        names = [*definition.key, *[c for c in columns if c not in definition.key]]
        schema = pa.schema([definition.column(n).arrow() for n in names])
        return pa.Table.from_pylist([{n: r[n] for n in names} for r in rows], schema=schema)

    @abstractmethod
    def update(self, table: str, rows: Rows, columns: Sequence[str]) -> None:
        """Set ``columns`` of the existing rows whose key is in ``rows``; other keys are ignored.

        ``columns`` must not include sorting-key columns (member, time)."""

    @abstractmethod
    def delete(self, table: str, where: str, params: Mapping[str, Any] | None = None) -> None: ...

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Atomic on DuckDB; on ClickHouse (no transactions) every step is idempotent instead."""
        yield

    def after_commit(self, action: Callable[[], None]) -> None:
        """Runs ``action`` once what this thread wrote so far is committed: at the end of the
        outermost transaction (never, if it rolls back), or now outside one and on engines
        without transactions (their writes are final when the call returns)."""
        action()

    def ensure_schema(self) -> None:
        """Creates the missing tables, and adds the columns a newer version declares (the
        warehouse's only migrations: additive; data is derived and can be reloaded)."""
        for definition in TABLES.values():
            self.execute(self._ddl(definition))
            present = self._columns(definition.name)
            for column in definition.columns:
                if column.name not in present:
                    self.execute(self._add_column(definition, column))

    @abstractmethod
    def _ddl(self, definition: TableDef) -> str: ...

    @abstractmethod
    def _columns(self, table: str) -> set[str]: ...

    @abstractmethod
    def _add_column(self, definition: TableDef, column: Column) -> str: ...

    def truncate(self) -> None:
        """Empties every table (tests, benchmarks)."""
        self.loaded_events.clear()
        for name in TABLES:
            self.execute(f"TRUNCATE TABLE {self.qualified(name)}")

    def close(self) -> None:
        return None


# ---------------------------------------------------------------- DuckDB


_DUCKDB_DATA_PREFIX = "_wh_duckdb_data_"
# Unique names of the Arrow tables handed to a query (both engines find them by name).
_data_names = itertools.count()


def _duckdb_arrow(relation: Any) -> pa.Table:
    if relation is None:
        return pa.table({})
    for name in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        method = getattr(relation, name, None)
        if method is not None:
            result = method()
            return result if isinstance(result, pa.Table) else result.read_all()
    raise RuntimeError("this duckdb cannot return Arrow tables")


class DuckDBWarehouse(Warehouse):
    dialect = "duckdb"

    def __init__(self, url: str, path: str) -> None:
        import duckdb

        super().__init__(url)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._con = duckdb.connect(path)
        except duckdb.Error as exc:  # e.g. the file is open in another process
            raise WarehouseError(f"Cannot open the DuckDB warehouse {path}: {exc}") from exc
        self._con.execute("SET TimeZone = 'UTC'")
        self._local = threading.local()
        self._depth = 0

    def _cursor(self) -> Any:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._con.cursor()
            cursor.execute("SET TimeZone = 'UTC'")
            self._local.cursor = cursor
        return cursor

    def qualified(self, table: str) -> str:
        return table

    def _string(self, value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    def _decimal(self, value: Decimal) -> str:
        scale = max(0, -int(value.as_tuple().exponent))
        return f"CAST('{value:f}' AS DECIMAL(38, {min(scale, 18)}))"

    def _timestamp(self, value: datetime) -> str:
        return f"TIMESTAMPTZ '{value.strftime('%Y-%m-%d %H:%M:%S.%f')}+00'"

    def _date(self, value: date) -> str:
        return f"DATE '{value.isoformat()}'"

    def _run(
        self, sql: str, params: Mapping[str, Any] | None, data: Mapping[str, Data] | None, *, fetch: bool
    ) -> pa.Table | None:
        # Arrow tables reach DuckDB through its replacement scan: a name in the SQL that is no
        # table is looked up among the calling frame's variables (here: this module's globals,
        # under a name unique to the call). Much cheaper than register()/unregister().
        names = {name: f"{_DUCKDB_DATA_PREFIX}{next(_data_names)}" for name in data or ()}
        text = self.render(sql, params, names)
        module = globals()
        try:
            for name, value in (data or {}).items():
                module[names[name]] = _arrow_of(value)
            cursor = self._cursor()
            if fetch:
                return _duckdb_arrow(cursor.sql(text))
            cursor.execute(text)
            return None
        finally:
            for unique in names.values():
                module.pop(unique, None)

    def execute(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> None:
        self._run(sql, params, data, fetch=False)

    def query_arrow(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> pa.Table:
        result = self._run(sql, params, data, fetch=True)
        assert result is not None
        return result

    def _insert_arrow(self, table: str, arrow: pa.Table) -> None:
        columns = ", ".join(quote(c) for c in arrow.column_names)
        self.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {{rows}}", data={"rows": arrow})

    def upsert(self, table: str, data: Data) -> int:
        arrow = self.to_arrow(table, data)
        if not arrow.num_rows:
            return 0
        key = TABLES[table].key
        match = " AND ".join(f"{table}.{quote(k)} = k.{quote(k)}" for k in key)
        with self.transaction():
            keys = arrow.select(list(key))
            self.execute(f"DELETE FROM {table} USING {{keys}} AS k WHERE {match}", data={"keys": keys})
            self._insert_arrow(table, arrow)
        return arrow.num_rows

    def _replace(
        self, table: str, where: str, params: Mapping[str, Any], old_rows: Rows, new_rows: Rows
    ) -> None:
        with self.transaction():
            self.delete(table, where, params)
            self.insert(table, new_rows)

    def update(self, table: str, rows: Rows, columns: Sequence[str]) -> None:
        if not rows:
            return
        key = TABLES[table].key
        changes = self._changes(table, rows, columns)
        assignments = ", ".join(f"{quote(c)} = d.{quote(c)}" for c in columns if c not in key)
        match = " AND ".join(f"{table}.{quote(k)} = d.{quote(k)}" for k in key)
        self.execute(
            f"UPDATE {table} SET {assignments} FROM {{changes}} AS d WHERE {match}", data={"changes": changes}
        )

    def delete(self, table: str, where: str, params: Mapping[str, Any] | None = None) -> None:
        self.execute(f"DELETE FROM {table} WHERE {where}", params)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth:
            local.depth = depth + 1
            try:
                yield
            finally:
                local.depth = depth
            return
        cursor = self._cursor()
        cursor.execute("BEGIN TRANSACTION")
        local.depth = 1
        local.after = []
        try:
            yield
        except BaseException:
            local.depth = 0
            local.after = []
            cursor.execute("ROLLBACK")
            raise
        local.depth = 0
        cursor.execute("COMMIT")
        actions, local.after = local.after, []
        for action in actions:
            action()

    def after_commit(self, action: Callable[[], None]) -> None:
        if getattr(self._local, "depth", 0):
            self._local.after.append(action)
        else:
            action()

    def _ddl(self, definition: TableDef) -> str:
        return definition.duckdb_ddl()

    def _columns(self, table: str) -> set[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $table", {"table": table}
        )
        return {r["column_name"] for r in rows}

    def _add_column(self, definition: TableDef, column: Column) -> str:
        return definition.duckdb_add_column(column)

    def truncate(self) -> None:
        self.loaded_events.clear()
        for name in TABLES:
            self.execute(f"DELETE FROM {name}")

    def close(self) -> None:
        self.loaded_events.clear()
        self._con.close()


# ---------------------------------------------------------------- ClickHouse (shared)


class _ClickHouseSQL(Warehouse):
    dialect = "clickhouse"
    database: str

    def qualified(self, table: str) -> str:
        return f"{self.database}.{table}"

    def ref(self, table: str) -> _Ref:
        return _Ref(self.qualified(table), " FINAL")

    def _string(self, value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    def _decimal(self, value: Decimal) -> str:
        scale = max(0, -int(value.as_tuple().exponent))
        return f"toDecimal128('{value:f}', {min(scale, 18)})"

    def _timestamp(self, value: datetime) -> str:
        return f"toDateTime64('{value.strftime('%Y-%m-%d %H:%M:%S.%f')}', 6, 'UTC')"

    def _date(self, value: date) -> str:
        return f"toDate32('{value.isoformat()}')"

    def _ddl(self, definition: TableDef) -> str:
        return definition.clickhouse_ddl(self.database)

    def _columns(self, table: str) -> set[str]:
        rows = self.query(
            "SELECT name FROM system.columns WHERE database = $db AND table = $table",
            {"db": self.database, "table": table},
        )
        return {r["name"] for r in rows}

    def _add_column(self, definition: TableDef, column: Column) -> str:
        return definition.clickhouse_add_column(self.database, column)

    def ensure_schema(self) -> None:
        self.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        super().ensure_schema()

    def upsert(self, table: str, data: Data) -> int:
        # ReplacingMergeTree keeps the newest version of a key; reads use FINAL.
        return self.insert(table, data)

    def _replace(
        self, table: str, where: str, params: Mapping[str, Any], old_rows: Rows, new_rows: Rows
    ) -> None:
        # New rows first, then tombstones for the old sorting keys that no new row reuses.
        definition = TABLES[table]
        self.insert(table, new_rows)
        reused = {tuple(r[c] for c in definition.order_by) for r in new_rows}
        self._tombstones(
            table, [r for r in old_rows if tuple(r[c] for c in definition.order_by) not in reused]
        )

    def _tombstones(self, table: str, rows: Rows) -> None:
        """Hides these rows: a newer version of each, marked deleted (``ReplacingMergeTree(ver,
        _deleted)``: FINAL leaves the key out, merges drop it). Far cheaper than a DELETE."""
        if not rows:
            return
        definition = TABLES[table]
        version = definition.version
        now = datetime.now(UTC)
        step = timedelta(microseconds=1)
        arrow = self.to_arrow(table, [{**r, version: max(now, r[version] + step)} for r in rows])
        arrow = arrow.append_column(DELETED_COLUMN, pa.array([1] * arrow.num_rows, pa.uint8()))
        self._insert_arrow(table, arrow)

    def update(self, table: str, rows: Rows, columns: Sequence[str]) -> None:
        # A new version of each row (read, changed, inserted): ReplacingMergeTree keeps it.
        if not rows:
            return
        key = TABLES[table].key
        changes = {tuple(r[k] for k in key): r for r in rows}
        keys = ", ".join(quote(k) for k in key)
        current = self.query(
            f"SELECT * FROM {{{table}}} WHERE ({keys}) IN (SELECT {keys} FROM {{changes}})",
            data={"changes": self._changes(table, rows, columns)},
        )
        updated = []
        for row in current:
            change = changes.get(tuple(row[k] for k in key))
            if change is not None:
                updated.append({**row, **{c: change[c] for c in columns}})
        self.insert(table, updated)

    def delete(self, table: str, where: str, params: Mapping[str, Any] | None = None) -> None:
        self._tombstones(table, self.query(f"SELECT * FROM {{{table}}} WHERE {where}", params))

    def drop_database(self) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {self.database}")


# Settings that make ClickHouse read the shared SQL the way DuckDB (and standard SQL) does.
_CLICKHOUSE_SETTINGS = {
    # LEFT JOIN without a match gives NULL, not the type's default value.
    "join_use_nulls": 1,
    # A column wins over a SELECT alias of the same name in WHERE/GROUP BY.
    "prefer_column_name_to_alias": 1,
}

_chdb_lock = threading.RLock()
_chdb_state: dict[str, Any] = {}
# Arrow tables passed to chdb's Python() table function are looked up by name in this module.
_CHDB_DATA_PREFIX = "_wh_chdb_data_"


def _close_temporary_chdb(path: str) -> None:
    """At exit: the temporary directory of ``chdb://`` goes with the process."""
    session = _chdb_state.pop("session", None)
    if session is not None:
        with contextlib.suppress(Exception):
            session.close()
    shutil.rmtree(path, ignore_errors=True)


def _chdb_session(path: str | None) -> tuple[Any, str]:
    """The process's one embedded ClickHouse, bound to the first path opened."""
    from chdb import session as chdb_session

    with _chdb_lock:
        current = _chdb_state.get("session")
        if current is not None:
            if path is not None and Path(path).resolve() != Path(_chdb_state["path"]).resolve():
                raise WarehouseError(
                    f"chdb is already open at {_chdb_state['path']} in this process; "
                    f"one process can use one chdb path (asked for {path})"
                )
            return current, _chdb_state["path"]
        if path is None:
            path = tempfile.mkdtemp(prefix="omniloyal-chdb-")
            atexit.register(_close_temporary_chdb, path)
        Path(path).mkdir(parents=True, exist_ok=True)
        session = chdb_session.Session(path)  # type: ignore[no-untyped-call]
        for name, value in _CLICKHOUSE_SETTINGS.items():
            session.query(f"SET {name} = {value}")  # type: ignore[no-untyped-call]
        _chdb_state.update(session=session, path=path)
        return session, path


class ChdbWarehouse(_ClickHouseSQL):
    """ClickHouse in-process. chdb calls are serialised by a process-wide lock: its ``Python()``
    table function finds the Arrow table by variable name, which is not safe across threads."""

    def __init__(self, url: str, path: str | None, database: str) -> None:
        super().__init__(url)
        self._session, self.path = _chdb_session(path)
        self.database = database

    def _run(
        self, sql: str, params: Mapping[str, Any] | None, data: Mapping[str, Data] | None, fmt: str
    ) -> Any:
        names = {name: f"{_CHDB_DATA_PREFIX}{next(_data_names)}" for name in data or ()}
        text = self.render(sql, params, {name: f"Python({unique})" for name, unique in names.items()})
        module = globals()
        with _chdb_lock:
            try:
                for name, value in (data or {}).items():
                    module[names[name]] = _arrow_of(value)
                return self._session.query(text, fmt)
            finally:
                for unique in names.values():
                    module.pop(unique, None)

    def execute(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> None:
        self._run(sql, params, data, "CSV")

    def query_arrow(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> pa.Table:
        result: pa.Table = self._run(sql, params, data, "ArrowTable")
        return result

    def _insert_arrow(self, table: str, arrow: pa.Table) -> None:
        columns = ", ".join(quote(c) for c in arrow.column_names)
        self.execute(
            f"INSERT INTO {self.qualified(table)} ({columns}) SELECT {columns} FROM {{rows}}"
            + (
                " SETTINGS insert_allow_materialized_columns = 1"
                if DELETED_COLUMN in arrow.column_names
                else ""
            ),
            data={"rows": arrow},
        )


# ---------------------------------------------------------------- ClickHouse server


class ClickHouseWarehouse(_ClickHouseSQL):
    """A ClickHouse server through clickhouse-connect (``pip install omniloyal[clickhouse]``).

    Same SQL and schema as :class:`ChdbWarehouse` (which the tests run); Arrow tables passed
    as ``data`` travel as external tables in Arrow format."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        try:
            import clickhouse_connect
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise WarehouseError(
                "clickhouse:// needs clickhouse-connect: pip install 'omniloyal[clickhouse]'"
            ) from exc
        parts = urlsplit(url)
        self.database = (parts.path or "/omniloyal").strip("/") or "omniloyal"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self._client = clickhouse_connect.get_client(
            host=parts.hostname or "localhost",
            port=parts.port or 8123,
            username=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            secure=query.get("secure") in ("1", "true"),
            settings=_CLICKHOUSE_SETTINGS,
        )
        self._lock = threading.RLock()

    def _external(self, data: Mapping[str, Data] | None) -> Any:  # pragma: no cover - needs a server
        if not data:
            return None
        from clickhouse_connect.driver.external import ExternalData

        external = None
        for name, value in data.items():
            table = _arrow_of(value)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            payload = sink.getvalue().to_pybytes()
            if external is None:
                external = ExternalData(data=payload, file_name=name, fmt="ArrowStream")
            else:
                external.add_file(data=payload, file_name=name, fmt="ArrowStream")
        return external

    def execute(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> None:  # pragma: no cover - needs a server
        text = self.render(sql, params, {name: name for name in data or ()})
        with self._lock:
            if data:
                self._client.query(text, external_data=self._external(data))
            else:
                self._client.command(text)

    def query_arrow(
        self, sql: str, params: Mapping[str, Any] | None = None, *, data: Mapping[str, Data] | None = None
    ) -> pa.Table:  # pragma: no cover - needs a server
        text = self.render(sql, params, {name: name for name in data or ()})
        with self._lock:
            result: pa.Table = self._client.query_arrow(text, external_data=self._external(data))
            return result

    def _insert_arrow(self, table: str, arrow: pa.Table) -> None:  # pragma: no cover - needs a server
        settings = {"insert_allow_materialized_columns": 1} if DELETED_COLUMN in arrow.column_names else None
        with self._lock:
            self._client.insert_arrow(table, arrow, database=self.database, settings=settings)

    def close(self) -> None:  # pragma: no cover - needs a server
        self._client.close()


# ---------------------------------------------------------------- opening


def open_warehouse(url: str, *, ensure_schema: bool = True) -> Warehouse:
    """A warehouse for ``url`` (see the module docs for the forms)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    warehouse: Warehouse
    if scheme == "duckdb":
        if not url.lower().startswith("duckdb:///"):
            raise WarehouseError(f"DuckDB warehouse URL must be duckdb:///path, not {url!r}")
        path = unquote(url[len("duckdb:///") :].split("?", 1)[0]) or ":memory:"
        warehouse = DuckDBWarehouse(url, path)
    elif scheme == "chdb":
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        database = query.get("database", "omniloyal")
        if not _IDENTIFIER.match(database):
            raise WarehouseError(f"chdb database name {database!r} must be letters, digits and _")
        chdb_path = unquote(parts.path) if parts.path not in ("", "/") else None
        warehouse = ChdbWarehouse(url, chdb_path, database)
    elif scheme == "clickhouse":
        warehouse = ClickHouseWarehouse(url)
    else:
        raise WarehouseError(f"Unknown warehouse URL {url!r}: use duckdb:///, chdb:// or clickhouse://")
    if ensure_schema:
        warehouse.ensure_schema()
    return warehouse


_cache: dict[str, Warehouse] = {}
_cache_lock = threading.Lock()


def get_warehouse(settings: Any) -> Warehouse:
    """The application's warehouse for ``settings.warehouse_url``: one instance per URL."""
    url: str = settings.warehouse_url
    with _cache_lock:
        warehouse = _cache.get(url)
        if warehouse is None:
            warehouse = open_warehouse(url)
            _cache[url] = warehouse
        return warehouse


def forget_warehouse(url: str) -> None:
    """Closes and drops the cached instance for ``url`` (tests)."""
    with _cache_lock:
        warehouse = _cache.pop(url, None)
    if warehouse is not None:
        warehouse.close()
