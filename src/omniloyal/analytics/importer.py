"""History from the retailer's DWH: ``omniloyal import events|purchases FILE``.

Files are CSV (``.csv``, ``.csv.gz``), Parquet (``.parquet``) or JSON lines (``.jsonl``,
``.ndjson``, ``.jsonl.gz``), read in batches (memory stays flat whatever the size). Every row
is checked on its own: a bad row goes to the error report (CSV: ``row, id, code, message,
field``; ``row`` is the 1-based number of the data record, the header not counted) and the
rest is loaded. Rows go straight into the warehouse through the sink (they are history, not
loyalty changes: no points move), so an import is idempotent by id: importing the same file
again changes nothing. Features of the members concerned are refreshed once, at the end.

**Events**: ``id``, ``type``, ``occurred_at`` (ISO 8601 with offset) are required; the
member by ``member_id`` or ``card`` / ``phone`` / ``email`` / ``external_id``, or an
``anonymous_id``; optional ``source`` (default ``dwh``), ``store``, ``received_at``,
``properties`` (a JSON object) and ``utm_*``; any other column becomes a property.

**Purchases**: ``id`` (the DWH's purchase id), ``cheque_at``, ``amount`` are required; the
buyer as above (none: an anonymous purchase); optional ``store``, ``channel`` (``offline``,
``online_store``, ``mobile_app``; default ``offline``), ``cheque_number``, ``discount``,
``paid``, ``points_accrued``, ``points_written_off``, ``currency`` (of the points; default
``bonus``), ``refunded`` (money refunded later), ``status`` (``cancelled`` to import a
cancelled purchase) and ``lines``: a JSON list of ``{sku, category, price, quantity, amount,
discount}``. A purchase is stored as operation ``dwh:<id>``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from omniloyal.analytics import features, sink
from omniloyal.analytics.schema import UTM_COLUMNS
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from omniloyal.events.envelope import EventEnvelope
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError
from omniloyal.members import service as members

REPORT_COLUMNS = ("row", "id", "code", "message", "field")
IDENTIFIERS = ("card", "phone", "email", "external_id")
CHANNELS = ("offline", "online_store", "mobile_app")
_TYPE = re.compile(r"^[a-z][a-z0-9_.]*$")
_EVENT_COLUMNS = frozenset(
    {"id", "type", "occurred_at", "received_at", "member_id", "anonymous_id", "source", "store", "properties"}
    | set(IDENTIFIERS)
    | set(UTM_COLUMNS)
)
# Distinct identifiers remembered between batches (a DWH file repeats its buyers).
_CACHE_LIMIT = 500_000


@dataclass(slots=True, frozen=True)
class RowError:
    row: int
    id: str | None
    code: str
    message: str
    field: str | None


@dataclass
class ImportResult:
    rows: int = 0
    loaded: int = 0
    duplicates: int = 0
    errors: int = 0
    seconds: float = 0.0
    report_path: Path | None = None
    members: set[int] = field(default_factory=set)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class _Invalid(Exception):
    def __init__(self, code: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


# ---------------------------------------------------------------- reading files


class _Source:
    """Batches of rows (dicts) from a CSV, Parquet or JSON-lines file."""

    def __init__(self, path: Path, batch_rows: int) -> None:
        self.path = path
        self.batch_rows = batch_rows
        name = path.name.lower()
        self.gz = name.endswith(".gz")
        base = name.removesuffix(".gz")
        if base.endswith((".parquet", ".pq")) and not self.gz:
            self.kind = "parquet"
            self.total = pq.ParquetFile(path).metadata.num_rows
        elif base.endswith(".csv"):
            self.kind = "csv"
            self.total = path.stat().st_size
        elif base.endswith((".jsonl", ".ndjson", ".json")):
            self.kind = "jsonl"
            self.total = path.stat().st_size
        else:
            raise AppError(
                "unsupported_file",
                "Import files are .csv, .csv.gz, .parquet, .jsonl or .jsonl.gz",
                field="file",
            )
        self.done = 0  # rows for Parquet, bytes for CSV and JSON lines
        # Rows that could not even be read (a broken JSON line): (row number, message).
        self.unreadable: list[tuple[int, str]] = []

    def batches(self) -> Iterator[list[dict[str, Any] | None]]:
        reader = {"parquet": self._parquet, "csv": self._csv, "jsonl": self._jsonl}[self.kind]
        yield from reader()

    def _parquet(self) -> Iterator[list[dict[str, Any] | None]]:
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_rows):
            self.done += batch.num_rows
            yield [{k.strip().lower(): v for k, v in r.items()} for r in batch.to_pylist()]

    def _csv(self) -> Iterator[list[dict[str, Any] | None]]:
        opener: Callable[..., Any] = gzip.open if self.gz else open
        with opener(self.path, "rt", encoding="utf-8-sig", newline="") as handle:
            header = str(handle.readline()).rstrip("\r\n")
        delimiter = ";" if header.count(";") > header.count(",") else ","
        names = next(csv.reader([header], delimiter=delimiter))
        columns = [n.strip().lower() for n in names]
        raw = pa.OSFile(str(self.path), "rb")
        stream: Any = pa.CompressedInputStream(raw, "gzip") if self.gz else raw
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=1 << 20, encoding="utf8"),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
                null_values=[""],
            ),
        )
        try:
            for batch in reader:
                self.done = raw.tell()
                values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                yield [dict(zip(columns, cells, strict=True)) for cells in zip(*values, strict=True)]
        finally:
            raw.close()

    def _jsonl(self) -> Iterator[list[dict[str, Any] | None]]:
        opener: Callable[..., Any] = gzip.open if self.gz else open
        rows: list[dict[str, Any] | None] = []
        number = 0
        with opener(self.path, "rb") as handle:
            for line in handle:
                self.done += len(line)
                text = line.strip()
                if not text:
                    continue
                number += 1
                try:
                    value = json.loads(text)
                    if not isinstance(value, dict):
                        raise ValueError("not a JSON object")
                    rows.append({str(k).strip().lower(): v for k, v in value.items()})
                except ValueError as exc:
                    self.unreadable.append((number, f"not a JSON object: {exc}"))
                    rows.append(None)
                if len(rows) >= self.batch_rows:
                    yield rows
                    rows = []
        if rows:
            yield rows


class _Report:
    """The error report, created at the first bad row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: io.TextIOWrapper | None = None
        self._writer: Any = None

    def write(self, errors: list[RowError]) -> None:
        for error in sorted(errors, key=lambda e: e.row):
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = self.path.open("w", encoding="utf-8", newline="")
                self._writer = csv.writer(self._handle)
                self._writer.writerow(REPORT_COLUMNS)
            self._writer.writerow((error.row, error.id or "", error.code, error.message, error.field or ""))

    @property
    def written(self) -> bool:
        return self._writer is not None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


# ---------------------------------------------------------------- values


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _required_text(row: dict[str, Any], name: str, limit: int = 200) -> str:
    value = row.get(name)
    if _blank(value):
        raise _Invalid("missing_field", f"{name} is required", name)
    text = str(value).strip()
    if len(text) > limit:
        raise _Invalid("too_long", f"{name} is longer than {limit} characters", name)
    return text


def _optional_text(row: dict[str, Any], name: str, limit: int = 200) -> str | None:
    value = row.get(name)
    if _blank(value):
        return None
    text = str(value).strip()
    if len(text) > limit:
        raise _Invalid("too_long", f"{name} is longer than {limit} characters", name)
    return text


def _time(row: dict[str, Any], name: str, *, required: bool) -> datetime | None:
    value = row.get(name)
    if _blank(value):
        if required:
            raise _Invalid("missing_field", f"{name} is required", name)
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise _Invalid("invalid_time", f"{name} {value!r} is not an ISO 8601 time", name) from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _Invalid(
            "invalid_time", f"{name} must carry a UTC offset, e.g. 2026-01-31T10:00:00+03:00", name
        )
    return moment.astimezone(UTC)


def _amount(
    row: dict[str, Any], name: str, *, required: bool = False, default: Decimal | None = None
) -> Decimal:
    value = row.get(name)
    if _blank(value):
        if required:
            raise _Invalid("missing_field", f"{name} is required", name)
        return default if default is not None else Decimal("0.00")
    if isinstance(value, float):
        value = repr(value)
    try:
        number = Decimal(str(value).strip().replace(",", "."))
    except InvalidOperation as exc:
        raise _Invalid("invalid_amount", f"{name} {value!r} is not a decimal amount", name) from exc
    if not number.is_finite() or number < 0:
        raise _Invalid("invalid_amount", f"{name} must be a finite amount of at least 0", name)
    return number


def _json_value(row: dict[str, Any], name: str, kind: type) -> Any:
    value = row.get(name)
    if _blank(value):
        return kind()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _Invalid("invalid_json", f"{name} is not valid JSON: {exc}", name) from exc
    if not isinstance(value, kind):
        raise _Invalid("invalid_json", f"{name} must be a JSON {'object' if kind is dict else 'list'}", name)
    return value


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a cell (Parquet gives datetimes, decimals, bytes)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- members


class _Members:
    """Resolves buyers by member id or identifier, a batch at a time, through the members service."""

    def __init__(self, db: Database | None, region: str) -> None:
        self.db = db
        self.region = region
        self._cache: dict[tuple[str, str], int | None] = {}

    def reference(self, row: dict[str, Any]) -> tuple[str, str] | None:
        member_id = row.get("member_id")
        if not _blank(member_id):
            try:
                number = int(str(member_id).strip())
            except ValueError as exc:
                raise _Invalid(
                    "invalid_value", f"member_id {member_id!r} is not a number", "member_id"
                ) from exc
            if number < 1:
                raise _Invalid("invalid_value", "member_id must be positive", "member_id")
            return ("member_id", str(number))
        given = [(k, str(row[k]).strip()) for k in IDENTIFIERS if not _blank(row.get(k))]
        if len(given) > 1:
            raise _Invalid(
                "ambiguous_member", "Give one of card, phone, email, external_id, not several", given[1][0]
            )
        return given[0] if given else None

    def resolve(self, refs: set[tuple[str, str]]) -> dict[tuple[str, str], int | str | None]:
        """Member id per reference, None when nobody has it, or the error code of a malformed one."""
        out: dict[tuple[str, str], int | str | None] = {}
        todo = []
        for ref in refs:
            if ref[0] == "member_id":
                out[ref] = int(ref[1])
            elif ref in self._cache:
                out[ref] = self._cache[ref]
            else:
                todo.append(ref)
        if todo:
            if self.db is None:
                raise AppError("database_required", "Resolving buyers by identifier needs the database")
            with self.db.reading() as session:
                for kind, value in sorted(todo):
                    try:
                        found = members.find_member_id(session, region=self.region, **{kind: value})
                    except AppError as exc:
                        out[(kind, value)] = exc.code
                        continue
                    out[(kind, value)] = found
                    if len(self._cache) < _CACHE_LIMIT:
                        self._cache[(kind, value)] = found
        return out


# ---------------------------------------------------------------- rows to envelopes


@dataclass
class _Parsed:
    row: int
    id: str
    ref: tuple[str, str] | None
    # Builds the envelopes once the member is known.
    build: Callable[[int | None], list[EventEnvelope]]


def _event_parser(received: datetime) -> Callable[[int, dict[str, Any], _Members], _Parsed]:
    def parse(number: int, row: dict[str, Any], resolver: _Members) -> _Parsed:
        event_id = _required_text(row, "id")
        event_type = _required_text(row, "type", 100)
        if not _TYPE.match(event_type):
            raise _Invalid(
                "invalid_value", f"type {event_type!r}: lower-case letters, digits, '_' and '.'", "type"
            )
        occurred_at = _time(row, "occurred_at", required=True)
        received_at = _time(row, "received_at", required=False) or received
        properties = dict(_json_value(row, "properties", dict))
        for name, value in row.items():
            if name not in _EVENT_COLUMNS and not _blank(value):
                properties[name] = _plain(value)
        utm = {k: str(row[k]).strip() for k in UTM_COLUMNS if not _blank(row.get(k))}
        ref = resolver.reference(row)
        anonymous_id = _optional_text(row, "anonymous_id")
        source = _optional_text(row, "source", 50) or "dwh"
        store = _optional_text(row, "store", 64)

        def build(member_id: int | None) -> list[EventEnvelope]:
            return [
                EventEnvelope(
                    id=event_id,
                    type=event_type,
                    occurred_at=occurred_at or received,
                    received_at=received_at,
                    member_id=member_id,
                    anonymous_id=anonymous_id,
                    source=source,
                    store=store,
                    properties=_plain(properties),
                    utm=utm,
                )
            ]

        return _Parsed(number, event_id, ref, build)

    return parse


def _lines(row: dict[str, Any]) -> list[dict[str, Any]]:
    lines = _json_value(row, "lines", list)
    out = []
    for index, line in enumerate(lines, start=1):
        field_name = f"lines[{index - 1}]"
        if not isinstance(line, dict):
            raise _Invalid("invalid_line", f"{field_name} must be an object", field_name)
        if _blank(line.get("sku")):
            raise _Invalid("missing_field", f"{field_name}.sku is required", f"{field_name}.sku")
        values = {}
        for name in ("price", "quantity", "amount", "discount"):
            values[name] = _amount(line, name, default=Decimal(1) if name == "quantity" else None)
        if _blank(line.get("amount")):
            values["amount"] = values["price"] * values["quantity"]
        out.append(
            {
                "line": int(line.get("line") or index),
                "sku": str(line["sku"]).strip(),
                "category": None if _blank(line.get("category")) else str(line["category"]).strip(),
                **{k: format(v, "f") for k, v in values.items()},
            }
        )
    return out


def _purchase_parser(received: datetime) -> Callable[[int, dict[str, Any], _Members], _Parsed]:
    def parse(number: int, row: dict[str, Any], resolver: _Members) -> _Parsed:
        purchase_id = _required_text(row, "id", 150)
        cheque_at = _time(row, "cheque_at", required=True) or received
        amount = _amount(row, "amount", required=True)
        discount = _amount(row, "discount")
        if discount > amount:
            raise _Invalid("invalid_amount", "discount is more than amount", "discount")
        paid = _amount(row, "paid", default=amount - discount)
        channel = _optional_text(row, "channel") or "offline"
        if channel not in CHANNELS:
            raise _Invalid("invalid_choice", f"channel must be one of {', '.join(CHANNELS)}", "channel")
        status = (_optional_text(row, "status") or "confirmed").lower()
        if status not in ("confirmed", "cancelled"):
            raise _Invalid("invalid_choice", "status must be confirmed or cancelled", "status")
        refunded = _amount(row, "refunded")
        currency = _optional_text(row, "currency", 20) or "bonus"
        accrued = _amount(row, "points_accrued")
        written_off = _amount(row, "points_written_off")
        lines = _lines(row)
        store = _optional_text(row, "store", 64)
        cheque_number = _optional_text(row, "cheque_number", 100)
        ref = resolver.reference(row)
        operation = f"dwh:{purchase_id}"

        def build(member_id: int | None) -> list[EventEnvelope]:
            common = {
                "received_at": received,
                "member_id": member_id,
                "source": "dwh",
                "store": store,
            }
            out = [
                EventEnvelope(
                    id=f"purchase.confirmed:{operation}",
                    type="purchase.confirmed",
                    occurred_at=cheque_at,
                    properties={
                        "operation": operation,
                        "operation_id": purchase_id,
                        "kind": "offline",
                        "channel": channel,
                        "cheque_number": cheque_number,
                        "amount": format(amount, "f"),
                        "discount": format(discount, "f"),
                        "paid": format(paid, "f"),
                        "write_off": {currency: format(written_off, "f")} if written_off else {},
                        "accrual": {currency: format(accrued, "f")} if accrued else {},
                        "payments": [],
                        "lines": lines,
                    },
                    **common,
                )
            ]
            if refunded:
                out.append(
                    EventEnvelope(
                        id=f"purchase.refunded:{operation}",
                        type="purchase.refunded",
                        occurred_at=cheque_at,
                        properties={
                            "operation": f"{operation}:refund",
                            "operation_id": purchase_id,
                            "purchase_operation": operation,
                            "channel": channel,
                            "amount": format(refunded, "f"),
                            "lines": [],
                        },
                        **common,
                    )
                )
            if status == "cancelled":
                out.append(
                    EventEnvelope(
                        id=f"purchase.cancelled:{operation}",
                        type="purchase.cancelled",
                        occurred_at=cheque_at,
                        properties={"operation": operation, "operation_id": purchase_id, "channel": channel},
                        **common,
                    )
                )
            return out

        return _Parsed(number, purchase_id, ref, build)

    return parse


# ---------------------------------------------------------------- the import


def _run(
    wh: Warehouse,
    db: Database | None,
    path: Path | str,
    parser: Callable[[int, dict[str, Any], _Members], _Parsed],
    *,
    required: tuple[str, ...],
    report_path: Path | str | None,
    batch_size: int,
    console: Console | None,
    region: str,
) -> ImportResult:
    if batch_size < 1:
        raise AppError("invalid_batch_size", "batch_size is at least 1", field="batch_size")
    path = Path(path)
    source = _Source(path, batch_size)
    report = _Report(
        Path(report_path) if report_path is not None else path.with_name(path.name + ".errors.csv")
    )
    resolver = _Members(db, region)
    result = ImportResult()
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]importing[/bold] {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )
    number = 0
    checked_columns = False
    try:
        with progress:
            task = progress.add_task(path.name, total=source.total, rows=0)
            for rows in source.batches():
                errors: list[RowError] = []
                parsed: list[_Parsed] = []
                for row in rows:
                    number += 1
                    if row is None:
                        continue
                    if not checked_columns and source.kind != "jsonl":
                        missing = [c for c in required if c not in row]
                        if missing:
                            raise AppError(
                                "missing_column", f"The file needs a {missing[0]} column", field=missing[0]
                            )
                        checked_columns = True
                    try:
                        parsed.append(parser(number, row, resolver))
                    except _Invalid as exc:
                        errors.append(RowError(number, _row_id(row), exc.code, exc.message, exc.field))
                for line, message in source.unreadable:
                    errors.append(RowError(line, None, "malformed_row", message, None))
                source.unreadable.clear()
                members_of = resolver.resolve({p.ref for p in parsed if p.ref is not None})
                envelopes: list[EventEnvelope] = []
                for item in parsed:
                    member: int | str | None = None
                    if item.ref is not None:
                        kind, value = item.ref
                        member = members_of.get(item.ref)
                        if isinstance(member, str):
                            message = f"{value!r} is not a valid {kind}"
                            errors.append(RowError(item.row, item.id, member, message, kind))
                            continue
                        if member is None:
                            message = f"No member with {kind} {value!r}"
                            errors.append(RowError(item.row, item.id, "unknown_member", message, kind))
                            continue
                    try:
                        envelopes.extend(item.build(member if isinstance(member, int) else None))
                    except ValidationError as exc:
                        first = exc.errors()[0]
                        errors.append(
                            RowError(
                                item.row,
                                item.id,
                                "invalid_value",
                                str(first.get("msg")),
                                ".".join(str(p) for p in first.get("loc", ())) or None,
                            )
                        )
                if envelopes:
                    loaded = sink.load(wh, envelopes, refresh_features=False)
                    result.loaded += loaded.loaded
                    result.duplicates += loaded.duplicates
                    result.members |= loaded.members
                result.errors += len({e.row for e in errors})
                report.write(errors)
                progress.update(task, completed=source.done, rows=number)
            _refresh(wh, result.members)
            progress.update(task, completed=source.total, rows=number)
    finally:
        report.close()
    result.rows = number
    result.seconds = time.perf_counter() - started
    result.report_path = report.path if report.written else None
    if console is not None:
        summary = (
            f"[bold]{result.rows:,}[/bold] rows in {result.seconds:.1f} s "
            f"({result.rows_per_second:,.0f} rows/s): [green]{result.loaded:,} events loaded[/green], "
            f"{result.duplicates:,} already there, "
            f"[{'red' if result.errors else 'green'}]{result.errors:,} errors[/]"
        )
        if result.report_path is not None:
            summary += f" → {result.report_path}"
        console.print(summary)
    return result


def _row_id(row: dict[str, Any]) -> str | None:
    value = row.get("id")
    return None if _blank(value) else str(value)[:200]


def _refresh(wh: Warehouse, member_ids: set[int], chunk: int = 20_000) -> None:
    ids = sorted(member_ids)
    for start in range(0, len(ids), chunk):
        with wh.write_lock, wh.transaction():
            features.refresh(wh, rebuilt_members=ids[start : start + chunk])


def import_events_file(
    wh: Warehouse,
    path: Path | str,
    *,
    db: Database | None = None,
    report_path: Path | str | None = None,
    batch_size: int = 5000,
    console: Console | None = None,
    region: str = "RU",
) -> ImportResult:
    """Imports an events file (see the module docs); ``db`` resolves members by identifier."""
    return _run(
        wh,
        db,
        path,
        _event_parser(utcnow()),
        required=("id", "type", "occurred_at"),
        report_path=report_path,
        batch_size=batch_size,
        console=console,
        region=region,
    )


def import_purchases_file(
    wh: Warehouse,
    path: Path | str,
    *,
    db: Database | None = None,
    report_path: Path | str | None = None,
    batch_size: int = 5000,
    console: Console | None = None,
    region: str = "RU",
) -> ImportResult:
    """Imports a purchases file (see the module docs); ``db`` resolves buyers by identifier."""
    return _run(
        wh,
        db,
        path,
        _purchase_parser(utcnow()),
        required=("id", "cheque_at", "amount"),
        report_path=report_path,
        batch_size=batch_size,
        console=console,
        region=region,
    )
