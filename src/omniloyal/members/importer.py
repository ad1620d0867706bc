"""Bulk member import: CSV (also ``.csv.gz``) or Parquet, streamed, idempotent by external id.

The file is read with pyarrow in record batches, every row is checked on its own and a bad
row goes to the error report while the rest lands. Memory stays flat whatever the file's size:
a constant working set (two batches: one parsed, one being written), SQLite's page cache
(raised to 128 MiB for the import, so resident memory climbs until it is full, then stays) and
8 bytes per row for the external ids seen (duplicates within the file). Rows
are written ``batch_size`` at a time, one transaction per batch, with plain executemany
statements: the identifiers of the batch are fetched with a few ``IN`` queries up front, so
no row costs a query of its own.

Conventions of the file:

* ``row`` in the error report is the 1-based number of the data record (the header is not
  counted), the same for CSV and Parquet.
* An empty cell means "not given": an import adds and corrects data, it never erases a
  value a member already has (a consent left empty is not withdrawn either).
* ``attr_<code>`` columns fill the custom attribute ``<code>``; it must be defined
  (``AttributeDefinition``) and the value is checked against its type.

:class:`MemberWriter` is the one place that inserts members in bulk: the demo retailer goes
through it too.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from heapq import merge
from itertools import repeat
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text
from sqlalchemy import Connection, Table, select
from sqlalchemy.exc import IntegrityError

from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError
from omniloyal.members.models import AttributeDefinition, Card, Member
from omniloyal.members.normalize import InvalidContact, normalize_email, normalize_phone

# Columns a member file may have, besides ``attr_<code>`` ones.
COLUMNS = (
    "external_id",
    "first_name",
    "last_name",
    "middle_name",
    "gender",
    "birth_date",
    "phone",
    "email",
    "city",
    "address",
    "timezone",
    "registered_at",
    "card_number",
    "card_kind",
    "card_state",
    "consent_email",
    "consent_sms",
    "consent_viber",
    "consent_push",
)
ATTRIBUTE_PREFIX = "attr_"
REPORT_COLUMNS = ("row", "external_id", "code", "message", "field")

_LIMITS = {
    "external_id": 100,
    "first_name": 100,
    "last_name": 100,
    "middle_name": 100,
    "city": 200,
    "address": 1000,
    "timezone": 64,
}
_GENDERS = {
    "male": "male",
    "m": "male",
    "м": "male",
    "муж": "male",
    "мужской": "male",
    "female": "female",
    "f": "female",
    "ж": "female",
    "жен": "female",
    "женский": "female",
}
_FLAGS = {
    "1": True,
    "true": True,
    "yes": True,
    "y": True,
    "да": True,
    "0": False,
    "false": False,
    "no": False,
    "n": False,
    "нет": False,
}
_CARD_KINDS = ("physical", "virtual")
_CARD_STATES = ("prepared", "issued", "activated")
_STATE_ORDER = {"prepared": 0, "issued": 1, "activated": 2}
_CARD_NUMBER = re.compile(r"^[0-9A-Z]{4,64}$")
_CARD_SEPARATORS = re.compile(r"[\s\-]")
_DOTTED_DATE = re.compile(r"^(\d{1,2})\.(\d{1,2})\.(\d{4})$")
# ASCII dot-atom local parts: what nearly every real address looks like. Those skip the
# full validator (~30 µs each); the domain is still validated once by it, then cached.
_PLAIN_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
# A person older than this is a typo (1889 for 1989), not a customer.
MAX_AGE_YEARS = 120
# Rows per IN (...) query: far below SQLite's and PostgreSQL's parameter limits.
_IN_CHUNK = 5000
# SQLite settings of the import's connection. Each batch dirties pages all over the unique
# indexes (phones, e-mails, card numbers arrive in random order); a bigger page cache keeps
# them in memory and a rarer WAL checkpoint copies each page to the database once every
# few batches instead of once a batch. Both are put back when the import ends.
_SQLITE_IMPORT_PRAGMAS = ("PRAGMA cache_size = -131072", "PRAGMA wal_autocheckpoint = 65536")
_SQLITE_DEFAULT_PRAGMAS = ("PRAGMA cache_size = -2000", "PRAGMA wal_autocheckpoint = 1000")


# ---------------------------------------------------------------- records shared with the demo


@dataclass(slots=True)
class CardRecord:
    """A card to give a member. ``replaced_by`` names a card of the same record."""

    number: str
    kind: str = "physical"
    state: str = "activated"
    blocked: bool = False
    block_reason: str | None = None
    replaced_by: str | None = None


@dataclass(slots=True)
class MemberRecord:
    """One member as the writer takes it: values already cleaned; ``None`` = not given."""

    row: int
    external_id: str
    first_name: str | None = None
    last_name: str | None = None
    middle_name: str | None = None
    gender: str | None = None
    birth_date: date | None = None
    phone: str | None = None
    email: str | None = None
    city: str | None = None
    address: str | None = None
    timezone: str | None = None
    registered_at: datetime | None = None
    children: list[dict[str, Any]] | None = None
    pets: list[str] | None = None
    attributes: dict[str, Any] | None = None
    consents: dict[str, bool] | None = None
    cards: list[CardRecord] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class RowError:
    row: int | None
    external_id: str | None
    code: str
    message: str
    field: str | None


@dataclass(slots=True)
class BatchOutcome:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[RowError] = field(default_factory=list)


@dataclass(slots=True)
class ImportResult:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: int = 0  # rows refused (each has at least one line in the report)
    rows: int = 0
    seconds: float = 0.0
    report_path: Path | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- value parsing


class _RowInvalid(Exception):
    def __init__(self, code: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def normalize_card_number(raw: str) -> str | None:
    """Card numbers as printed: spaces and dashes dropped, letters upper-cased; None if malformed."""
    number = _CARD_SEPARATORS.sub("", raw).upper()
    return number if _CARD_NUMBER.match(number) else None


@lru_cache(maxsize=4096)
def _email_domain(domain: str) -> str | None:
    try:
        return normalize_email("a@" + domain).rpartition("@")[2]
    except InvalidContact:
        return None


def fast_email(raw: str) -> str:
    """Same result as :func:`normalize_email`, without its cost for plain ASCII addresses."""
    text = raw.strip()
    local, at, domain = text.rpartition("@")
    if at and len(local) <= 64 and len(text) <= 254 and _PLAIN_LOCAL.match(local):
        normalized = _email_domain(domain)
        if normalized is not None:
            return f"{local.lower()}@{normalized}"
    return normalize_email(text)


def _parse_date(text: str, field: str, code: str) -> date:
    try:
        if (dotted := _DOTTED_DATE.match(text)) is not None:
            return date(int(dotted[3]), int(dotted[2]), int(dotted[1]))
        return date.fromisoformat(text)
    except ValueError as exc:
        raise _RowInvalid(code, f"{text!r} is not a date (YYYY-MM-DD or DD.MM.YYYY)", field) from exc


def _parse_time(text: str, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _RowInvalid("invalid_time", f"{text!r} is not an ISO 8601 time", field) from exc
    if moment.utcoffset() is None:
        raise _RowInvalid(
            "invalid_time", f"{field} must carry a UTC offset, e.g. 2026-01-31T10:00:00+03:00", field
        )
    return moment.astimezone(UTC)


def _parse_flag(text: str, field: str, code: str) -> bool:
    flag = _FLAGS.get(text.lower())
    if flag is None:
        raise _RowInvalid(code, f"{text!r} is not one of 1/0, true/false, yes/no", field)
    return flag


def _attribute_value(definition: AttributeRule, text: str, field: str) -> Any:
    """The text of a cell as the attribute's stored JSON value (same rules as the members API)."""
    kind = definition.type
    limits = definition.constraints or {}
    code = definition.code

    def invalid(message: str) -> _RowInvalid:
        return _RowInvalid("invalid_attribute", message, field)

    def in_range(number: Decimal) -> None:
        if limits.get("min") is not None and number < Decimal(str(limits["min"])):
            raise invalid(f"{code} must be at least {limits['min']}")
        if limits.get("max") is not None and number > Decimal(str(limits["max"])):
            raise invalid(f"{code} must be at most {limits['max']}")

    if kind == "string":
        if limits.get("max_length") is not None and len(text) > int(limits["max_length"]):
            raise invalid(f"{code} is at most {limits['max_length']} characters")
        if limits.get("pattern") and re.fullmatch(limits["pattern"], text) is None:
            raise invalid(f"{code} does not match {limits['pattern']!r}")
        return text
    if kind == "integer":
        try:
            whole = int(text)
        except ValueError as exc:
            raise invalid(f"{code} is a whole number") from exc
        in_range(Decimal(whole))
        return whole
    if kind == "decimal":
        try:
            number = Decimal(text)
        except InvalidOperation as exc:
            raise invalid(f'{code} is a decimal number such as "10.50"') from exc
        if not number.is_finite():
            raise invalid(f"{code} must be a finite number")
        in_range(number)
        return format(number, "f")
    if kind == "boolean":
        flag = _FLAGS.get(text.lower())
        if flag is None:
            raise invalid(f"{code} is true or false")
        return flag
    if kind == "date":
        return _parse_date(text, field, "invalid_attribute").isoformat()
    if kind == "datetime":
        try:
            return _parse_time(text, field).isoformat()
        except _RowInvalid as exc:
            raise invalid(f"{code} is an ISO 8601 time with offset") from exc
    if text not in (definition.choices or []):
        raise invalid(f"{code} is one of {', '.join(definition.choices or [])}")
    return text


@lru_cache(maxsize=1)
def _time_zones() -> frozenset[str]:
    return frozenset(available_timezones())


class RowParser:
    """Turns the cells of one row into a :class:`MemberRecord`, or the list of what is wrong."""

    def __init__(
        self,
        columns: Sequence[str],
        definitions: dict[str, AttributeRule],
        *,
        region: str = "RU",
    ) -> None:
        self.columns = list(columns)
        self.region = region
        # (column, definition or None when unknown) for every attr_ column, in file order.
        self.attribute_columns = [
            (name, definitions.get(name[len(ATTRIBUTE_PREFIX) :]))
            for name in columns
            if name.startswith(ATTRIBUTE_PREFIX)
        ]
        today = (utcnow() + timedelta(hours=14)).date()  # already "today" somewhere at UTC+14
        self.latest_birth = today
        self.earliest_birth_year = today.year - MAX_AGE_YEARS

    def parse(self, row: int, cells: Sequence[str | None]) -> MemberRecord | list[RowError]:
        """``cells``: known columns in :data:`COLUMNS` order, then the attr_ columns."""
        (
            external_id,
            first_name,
            last_name,
            middle_name,
            gender,
            birth_date,
            phone,
            email,
            city,
            address,
            timezone,
            registered_at,
            card_number,
            card_kind,
            card_state,
            consent_email,
            consent_sms,
            consent_viber,
            consent_push,
        ) = cells[:19]
        errors: list[RowError] = []

        def fail(code: str, message: str, field: str | None) -> None:
            errors.append(RowError(row, external_id, code, message, field))

        if external_id is None:
            fail("missing_external_id", "external_id is required: it identifies the member", "external_id")
        if (
            (external_id is not None and len(external_id) > 100)
            or (first_name is not None and len(first_name) > 100)
            or (last_name is not None and len(last_name) > 100)
            or (middle_name is not None and len(middle_name) > 100)
            or (city is not None and len(city) > 200)
            or (address is not None and len(address) > 1000)
            or (timezone is not None and len(timezone) > 64)
        ):
            for name, value in zip(
                _LIMITS,
                (external_id, first_name, last_name, middle_name, city, address, timezone),
                strict=True,
            ):
                if value is not None and len(value) > _LIMITS[name]:
                    fail("value_too_long", f"{name} is at most {_LIMITS[name]} characters", name)
        record = MemberRecord(
            row=row,
            external_id=external_id or "",
            first_name=first_name,
            last_name=last_name,
            middle_name=middle_name,
            city=city,
            address=address,
        )
        if gender is not None:
            record.gender = _GENDERS.get(gender.lower())
            if record.gender is None:
                fail("invalid_gender", f"{gender!r} is not male/female (m/f, м/ж)", "gender")
        if birth_date is not None:
            try:
                born = _parse_date(birth_date, "birth_date", "invalid_birth_date")
                if born > self.latest_birth:
                    raise _RowInvalid("invalid_birth_date", "The birth date is in the future", "birth_date")
                if born.year < self.earliest_birth_year:
                    raise _RowInvalid(
                        "invalid_birth_date",
                        f"A birth date more than {MAX_AGE_YEARS} years ago is not plausible",
                        "birth_date",
                    )
                record.birth_date = born
            except _RowInvalid as exc:
                fail(exc.code, exc.message, exc.field)
        if phone is not None:
            try:
                record.phone = normalize_phone(phone, self.region)
            except AppError as exc:
                fail(exc.code, exc.message, "phone")
        if email is not None:
            try:
                record.email = fast_email(email)
            except AppError as exc:
                fail(exc.code, exc.message, "email")
        if timezone is not None:
            if timezone in _time_zones():
                record.timezone = timezone
            else:
                fail("invalid_timezone", f"{timezone!r} is not an IANA time zone", "timezone")
        if registered_at is not None:
            try:
                record.registered_at = _parse_time(registered_at, "registered_at")
            except _RowInvalid as exc:
                fail(exc.code, exc.message, exc.field)
        if card_number is not None:
            number = normalize_card_number(card_number)
            if number is None:
                fail("invalid_card_number", "A card number is 4 to 64 digits or Latin letters", "card_number")
            kind = "physical" if card_kind is None else card_kind.lower()
            state = "activated" if card_state is None else card_state.lower()
            if kind not in _CARD_KINDS:
                fail("invalid_card_kind", f"{card_kind!r} is not physical or virtual", "card_kind")
            if state not in _CARD_STATES:
                fail(
                    "invalid_card_state", f"{card_state!r} is not prepared, issued or activated", "card_state"
                )
            if number is not None:
                record.cards.append(CardRecord(number=number, kind=kind, state=state))
        elif card_kind is not None or card_state is not None:
            fail("missing_card_number", "card_kind and card_state describe a card_number", "card_number")
        consents: dict[str, bool] = {}
        for channel, value in (
            ("email", consent_email),
            ("sms", consent_sms),
            ("viber", consent_viber),
            ("push", consent_push),
        ):
            if value is not None:
                flag = _FLAGS.get(value.lower())
                if flag is None:
                    fail(
                        "invalid_consent",
                        f"{value!r} is not one of 1/0, true/false, yes/no",
                        f"consent_{channel}",
                    )
                else:
                    consents[channel] = flag
        if consents:
            record.consents = consents
        if self.attribute_columns:
            attributes: dict[str, Any] = {}
            for (name, definition), value in zip(self.attribute_columns, cells[19:], strict=True):
                if value is None:
                    continue
                if definition is None:
                    fail("unknown_attribute", f"No custom attribute {name[len(ATTRIBUTE_PREFIX) :]!r}", name)
                    continue
                try:
                    attributes[definition.code] = _attribute_value(definition, value, name)
                except _RowInvalid as exc:
                    fail(exc.code, exc.message, exc.field)
            if attributes:
                record.attributes = attributes
        return errors or record


# ---------------------------------------------------------------- the batch writer


class _SeenKeys:
    """External ids met so far in one file, as 64-bit hashes: ~8 bytes a row, exact in practice."""

    def __init__(self) -> None:
        self._recent: set[int] = set()
        self._sorted = array("q")

    def __contains__(self, key: int) -> bool:
        if key in self._recent:
            return True
        found = self._sorted
        i = bisect_left(found, key)
        return i < len(found) and found[i] == key

    def add(self, key: int) -> None:
        self._recent.add(key)
        if len(self._recent) >= max(1 << 18, len(self._sorted) >> 3):
            self._sorted = array("q", merge(self._sorted, sorted(self._recent)))
            self._recent.clear()


def _chunks(values: Sequence[Any], size: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _identity(value: Any) -> Any:
    return value


def sqlite_time(value: datetime | None) -> str | None:
    """What ``UTCDateTime`` stores on SQLite (naive UTC, microseconds always), ~6x cheaper."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()} refused: times are UTC-aware inside")
    u = value.astimezone(UTC) if value.utcoffset() else value
    day = f"{u.year:04d}-{u.month:02d}-{u.day:02d}"
    return f"{day} {u.hour:02d}:{u.minute:02d}:{u.second:02d}.{u.microsecond:06d}"


# Scalar questionnaire columns, in the order of every statement below.
_MEMBER_FIELDS = (
    "first_name",
    "last_name",
    "middle_name",
    "gender",
    "birth_date",
    "phone",
    "email",
    "city",
    "address",
    "timezone",
    "registered_at",
)
_JSON_FIELDS = ("children", "pets", "attributes")
_N = len(_MEMBER_FIELDS)


class MemberWriter:
    """Writes batches of :class:`MemberRecord`: inserts new members, updates changed ones.

    One transaction per batch; a row that conflicts with the store or with an earlier row of
    the batch is refused alone (``duplicate_identifier``, ``card_limit_reached``...).
    Statements are plain executemany with tuples; values are converted by the columns' own
    SQLAlchemy bind processors, so they are stored exactly as the ORM would store them, and
    stored rows are compared in that form (no decoding of what the row does not touch).
    """

    def __init__(
        self,
        db: Database,
        *,
        consent_source: str = "import",
        required_attributes: Iterable[str] = (),
    ) -> None:
        self.db = db
        self.consent_source = consent_source
        self.required_attributes = tuple(required_attributes)
        dialect = db.engine.dialect
        self._sqlite = dialect.name == "sqlite"
        mark = "?" if self._sqlite else "%s"

        def processor(table: Table, column: str) -> Callable[[Any], Any]:
            kind = table.c[column].type
            bind = kind.dialect_impl(dialect).bind_processor(dialect)
            return bind or _identity

        members, cards = Member.__table__, Card.__table__
        assert isinstance(members, Table) and isinstance(cards, Table)
        self._date = processor(members, "birth_date")
        self._time = sqlite_time if self._sqlite else processor(members, "registered_at")
        self._json = processor(members, "attributes")
        self._bool = processor(cards, "blocked")
        self._empty_list = self._json([])
        self._empty_dict = self._json({})

        def insert(table: str, names: Sequence[str]) -> str:
            return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(mark for _ in names)})"

        def update(table: str, names: Sequence[str], keys: Sequence[str]) -> str:
            sets = ", ".join(f"{n} = {mark}" for n in names)
            return f"UPDATE {table} SET {sets} WHERE " + " AND ".join(f"{k} = {mark}" for k in keys)

        self._select_members = (
            f"SELECT id, external_id, {', '.join(_MEMBER_FIELDS)}, {', '.join(_JSON_FIELDS)} "
            "FROM members WHERE external_id"
        )
        self._insert_member = insert(
            "members",
            (
                "external_id",
                "status",
                *_MEMBER_FIELDS,
                *_JSON_FIELDS,
                "preferred_categories",
                "created_at",
                "updated_at",
            ),
        )
        self._update_member = update("members", (*_MEMBER_FIELDS, *_JSON_FIELDS, "updated_at"), ("id",))
        self._insert_card = insert(
            "cards",
            (
                "number",
                "member_id",
                "kind",
                "state",
                "blocked",
                "block_reason",
                "blocked_at",
                "issued_at",
                "activated_at",
                "created_at",
                "updated_at",
            ),
        )
        self._update_card = (
            f"UPDATE cards SET member_id = {mark}, state = {mark}, issued_at = COALESCE(issued_at, {mark}), "
            f"activated_at = COALESCE(activated_at, {mark}), updated_at = {mark} WHERE id = {mark}"
        )
        self._link_replacement = (
            f"UPDATE cards SET replaced_by_id = (SELECT c.id FROM cards c WHERE c.number = {mark}) "
            f"WHERE number = {mark}"
        )
        self._insert_consent = insert(
            "member_consents", ("member_id", "channel", "granted", "changed_at", "source")
        )
        self._update_consent = update(
            "member_consents", ("granted", "changed_at", "source"), ("member_id", "channel")
        )

    # -- public

    def write(self, records: Sequence[MemberRecord]) -> BatchOutcome:
        """One transaction. Retried when a concurrent writer took an identifier meanwhile."""
        for attempt in range(3):
            try:
                with self.db.transaction() as session:
                    return self._write(session.connection(), records)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Puts the connection's settings back and folds the write-ahead log into the database."""
        if not self._sqlite:
            return
        raw = self.db.engine.raw_connection()  # autocommit: a checkpoint cannot run in a transaction
        try:
            cursor = raw.cursor()
            for pragma in (*_SQLITE_DEFAULT_PRAGMAS, "PRAGMA wal_checkpoint(PASSIVE)"):
                cursor.execute(pragma)
            cursor.close()
        finally:
            raw.close()

    # -- reading what the batch touches

    def _where_in(self, cursor: Any, head: str, values: Sequence[Any]) -> list[Any]:
        """Rows of ``head`` (a query ending with a column name) whose column is one of ``values``."""
        rows: list[Any] = []
        for chunk in _chunks(values):
            if self._sqlite:
                cursor.execute(f"{head} IN ({', '.join('?' * len(chunk))})", tuple(chunk))
            else:
                cursor.execute(f"{head} = ANY(%s)", (list(chunk),))
            rows.extend(cursor.fetchall())
        return rows

    def _decode(self, raw: Any) -> Any:
        return json.loads(raw) if isinstance(raw, str) else raw

    def _encode_again(self, raw: Any) -> Any:
        # SQLite hands JSON back as its text: written back untouched. PostgreSQL decodes it.
        return raw if isinstance(raw, str) else self._json(raw)

    # -- deciding and writing

    def _write(self, conn: Connection, records: Sequence[MemberRecord]) -> BatchOutcome:
        # The DBAPI cursor of the session's connection (same transaction): no Row objects,
        # no per-statement events; the batch is a handful of statements anyway.
        cursor = conn.connection.cursor()
        try:
            return self._write_with(cursor, records)
        finally:
            cursor.close()

    def _write_with(self, cursor: Any, records: Sequence[MemberRecord]) -> BatchOutcome:
        if self._sqlite:
            for pragma in _SQLITE_IMPORT_PRAGMAS:
                cursor.execute(pragma)
        outcome = BatchOutcome()
        existing = {
            row[1]: row
            for row in self._where_in(cursor, self._select_members, [r.external_id for r in records])
        }
        phone_owner = dict(
            self._where_in(
                cursor, "SELECT phone, id FROM members WHERE phone", [r.phone for r in records if r.phone]
            )
        )
        email_owner = dict(
            self._where_in(
                cursor, "SELECT email, id FROM members WHERE email", [r.email for r in records if r.email]
            )
        )
        cards = {
            row[0]: row
            for row in self._where_in(
                cursor,
                "SELECT number, id, member_id, kind, state FROM cards WHERE number",
                [c.number for r in records for c in r.cards],
            )
        }
        consents: dict[int, dict[str, bool]] = {}
        activated: dict[int, dict[str, str]] = {}
        if existing:
            ids = [row[0] for row in existing.values()]
            head = "SELECT member_id, channel, granted FROM member_consents WHERE member_id"
            for owner_id, channel, granted in self._where_in(cursor, head, ids):
                consents.setdefault(owner_id, {})[channel] = bool(granted)
            head = "SELECT member_id, kind, number FROM cards WHERE state = 'activated' AND member_id"
            for owner_id, kind, number in self._where_in(cursor, head, ids):
                activated.setdefault(owner_id, {})[kind] = number

        now = utcnow()
        now_db = self._time(now)
        source = self.consent_source
        to_date, to_time, to_json = self._date, self._time, self._json
        flags = {True: self._bool(True), False: self._bool(False)}
        # Identifiers taken by earlier rows of this batch: identifier → external id.
        claimed: dict[tuple[str, str], str] = {}
        new_members: list[tuple[MemberRecord, tuple[Any, ...]]] = []
        member_updates: list[tuple[Any, ...]] = []
        card_inserts: list[tuple[MemberRecord, CardRecord, Any]] = []
        card_updates: list[tuple[Any, ...]] = []
        consent_inserts: list[tuple[Any, ...]] = []
        consent_updates: list[tuple[Any, ...]] = []

        for record in records:
            current = existing.get(record.external_id)
            member_id: int | None = None if current is None else current[0]
            error = self._conflict(record, member_id, phone_owner, email_owner, cards, claimed, activated)
            if error is None and current is None:
                missing = [c for c in self.required_attributes if (record.attributes or {}).get(c) is None]
                if missing:
                    error = RowError(
                        record.row,
                        record.external_id,
                        "missing_attribute",
                        f"The custom attribute {missing[0]!r} is required",
                        ATTRIBUTE_PREFIX + missing[0],
                    )
            if error is not None:
                outcome.errors.append(error)
                continue
            if record.phone is not None:
                claimed[("phone", record.phone)] = record.external_id
            if record.email is not None:
                claimed[("email", record.email)] = record.external_id
            for card in record.cards:
                claimed[("card", card.number)] = record.external_id
            # The row's values as the store keeps them (None: not given).
            given = (
                record.first_name,
                record.last_name,
                record.middle_name,
                record.gender,
                None if record.birth_date is None else to_date(record.birth_date),
                record.phone,
                record.email,
                record.city,
                record.address,
                record.timezone,
                None if record.registered_at is None else to_time(record.registered_at),
            )
            moment = now_db if given[10] is None else given[10]  # when its cards were issued
            if current is None:
                new_members.append((record, given))
                card_inserts.extend((record, card, moment) for card in record.cards)
                outcome.inserted += 1
                continue

            # An existing member: merge what the row gives, write only what differs.
            assert member_id is not None
            stored_values = current[2 : 2 + _N]
            merged = tuple(
                kept if value is None else value for value, kept in zip(given, stored_values, strict=True)
            )
            changed = merged != stored_values
            json_changes: dict[int, Any] = {}
            for k, value in enumerate((record.children, record.pets)):
                if value is not None and self._decode(current[2 + _N + k]) != value:
                    json_changes[k] = to_json(value)
            if record.attributes:
                attributes = self._decode(current[4 + _N]) or {}
                if any(attributes.get(code) != v for code, v in record.attributes.items()):
                    json_changes[2] = to_json({**attributes, **record.attributes})
            if changed or json_changes:
                changed = True
                json_values = [
                    json_changes[k] if k in json_changes else self._encode_again(current[2 + _N + k])
                    for k in range(len(_JSON_FIELDS))
                ]
                member_updates.append((*merged, *json_values, now_db, member_id))
            for card in record.cards:
                stored = cards.get(card.number)
                if stored is None:
                    card_inserts.append((record, card, moment))
                    changed = True
                    continue
                _, card_id, owner, _, state = stored
                if state in _STATE_ORDER and (
                    owner is None or _STATE_ORDER[state] < _STATE_ORDER[card.state]
                ):
                    # Linked when it waited unassigned; moved forward, never back.
                    state = max(state, card.state, key=_STATE_ORDER.__getitem__)
                    card_updates.append(
                        (
                            member_id,
                            state,
                            moment if state != "prepared" else None,
                            moment if state == "activated" else None,
                            now_db,
                            card_id,
                        )
                    )
                    changed = True
            if record.consents:
                have = consents.get(member_id, {})
                for channel, granted in record.consents.items():
                    before = have.get(channel)
                    if before is None:
                        consent_inserts.append((member_id, channel, flags[granted], now_db, source))
                        changed = True
                    elif before != granted:
                        consent_updates.append((flags[granted], now_db, source, member_id, channel))
                        changed = True
            if changed:
                outcome.updated += 1
            else:
                outcome.unchanged += 1

        run = cursor.executemany
        new_ids: dict[str, int] = {}
        if new_members:
            empty_list, empty_dict = self._empty_list, self._empty_dict
            run(
                self._insert_member,
                [
                    (
                        r.external_id,
                        "active",
                        *given[:10],
                        now_db if given[10] is None else given[10],
                        empty_list if not r.children else to_json(r.children),
                        empty_list if not r.pets else to_json(r.pets),
                        empty_dict if not r.attributes else to_json(r.attributes),
                        empty_list,
                        now_db,
                        now_db,
                    )
                    for r, given in new_members
                ],
            )
            head = "SELECT external_id, id FROM members WHERE external_id"
            new_ids = dict(self._where_in(cursor, head, [r.external_id for r, _ in new_members]))
            for record, _ in new_members:
                if record.consents:
                    member_id = new_ids[record.external_id]
                    consent_inserts.extend(
                        (member_id, channel, flags[granted], now_db, source)
                        for channel, granted in record.consents.items()
                    )
        if member_updates:
            run(self._update_member, member_updates)
        if card_inserts:
            rows = []
            replacements = []
            for record, card, moment in card_inserts:
                owner_id = new_ids.get(record.external_id) or existing[record.external_id][0]
                rows.append(
                    (
                        card.number,
                        owner_id,
                        card.kind,
                        card.state,
                        flags[card.blocked],
                        card.block_reason,
                        moment if card.blocked else None,
                        moment if card.state != "prepared" else None,
                        moment if card.state in ("activated", "replaced") else None,
                        now_db,
                        now_db,
                    )
                )
                if card.replaced_by is not None:
                    replacements.append((card.replaced_by, card.number))
            run(self._insert_card, rows)
            if replacements:
                run(self._link_replacement, replacements)
        if card_updates:
            run(self._update_card, card_updates)
        if consent_inserts:
            run(self._insert_consent, consent_inserts)
        if consent_updates:
            run(self._update_consent, consent_updates)
        return outcome

    def _conflict(
        self,
        record: MemberRecord,
        member_id: int | None,
        phone_owner: dict[str, int],
        email_owner: dict[str, int],
        cards: dict[str, Any],
        claimed: dict[tuple[str, str], str],
        activated: dict[int, dict[str, str]],
    ) -> RowError | None:
        def refuse(code: str, message: str, field: str) -> RowError:
            return RowError(record.row, record.external_id, code, message, field)

        for kind, value, owners in (
            ("phone", record.phone, phone_owner),
            ("email", record.email, email_owner),
        ):
            if value is None:
                continue
            owner = owners.get(value)
            if owner is not None and owner != member_id:
                return refuse("duplicate_identifier", f"The {kind} {value} belongs to another member", kind)
            taken = claimed.get((kind, value))
            if taken is not None and taken != record.external_id:
                return refuse(
                    "duplicate_identifier", f"The {kind} {value} is also given to {taken} in this file", kind
                )
        if not record.cards:
            return None
        seen: set[str] = set()
        kinds_activated = dict(activated.get(member_id, {})) if member_id is not None else {}
        for card in record.cards:
            number = card.number
            if number in seen:
                return refuse("duplicate_identifier", f"Card {number} is given twice", "card_number")
            seen.add(number)
            taken = claimed.get(("card", number))
            if taken is not None and taken != record.external_id:
                return refuse(
                    "duplicate_identifier",
                    f"Card {number} is also given to {taken} in this file",
                    "card_number",
                )
            stored = cards.get(number)
            if stored is not None:
                _, _, owner, kind, state = stored
                if owner is not None and owner != member_id:
                    return refuse(
                        "duplicate_identifier", f"Card {number} belongs to another member", "card_number"
                    )
                if kind != card.kind:
                    return refuse("card_kind_mismatch", f"Card {number} is a {kind} card", "card_kind")
                if owner is None and state not in ("prepared", "issued"):
                    return refuse("invalid_card_state", f"Card {number} is {state}", "card_number")
                if owner == member_id and state not in ("prepared", "issued"):
                    continue  # activated, or replaced since the file was made: nothing to do
            if card.state == "activated":
                other = kinds_activated.get(card.kind)
                if other is not None and other != number:
                    return refuse(
                        "card_limit_reached",
                        f"The member already has an activated {card.kind} card ({other})",
                        "card_number",
                    )
                kinds_activated[card.kind] = number
        return None


# ---------------------------------------------------------------- reading the file


def _cell_texts(column: pa.Array | pa.ChunkedArray) -> list[str | None]:
    """A column as stripped strings (``None`` for empty), whatever its Parquet type."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        # Trimmed and emptied in Arrow (C, no GIL), not a Python call per cell.
        trimmed = pc.utf8_trim_whitespace(column)
        texts: list[str | None] = pc.if_else(pc.equal(trimmed, ""), None, trimmed).to_pylist()
        return texts
    texts = []
    for v in column.to_pylist():
        if v is None:
            texts.append(None)
        elif isinstance(v, bool):
            texts.append("true" if v else "false")
        elif isinstance(v, float) and v.is_integer():
            texts.append(str(int(v)))
        elif isinstance(v, datetime | date):
            texts.append(v.isoformat())
        elif isinstance(v, bytes):
            texts.append(v.decode("utf-8", "replace").strip() or None)
        else:
            texts.append(str(v).strip() or None)
    return texts


class _Source:
    """Record batches of a member file, with how far through the file the reader is."""

    def __init__(self, path: Path, batch_rows: int) -> None:
        self.path = path
        self.batch_rows = batch_rows
        self.malformed: list[RowError] = []
        name = path.name.lower()
        if name.endswith(".parquet") or name.endswith(".pq"):
            self.kind = "parquet"
            self._parquet = pq.ParquetFile(path)
            self.columns = [c.strip().lower() for c in self._parquet.schema_arrow.names]
            self.total = self._parquet.metadata.num_rows
        elif name.endswith(".csv") or name.endswith(".csv.gz"):
            self.kind = "csv"
            self.total = path.stat().st_size
            header = self._csv_header(path, name.endswith(".gz"))
            self.delimiter = ";" if header.count(";") > header.count(",") else ","
            self._raw_names = next(csv.reader([header], delimiter=self.delimiter))
            self.columns = [c.strip().lower() for c in self._raw_names]
        else:
            raise AppError("unsupported_file", "Member files are .csv, .csv.gz or .parquet", field="file")
        self.done = 0  # rows for Parquet, bytes for CSV

    @staticmethod
    def _csv_header(path: Path, gz: bool) -> str:
        import gzip

        opener = gzip.open if gz else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            return str(handle.readline()).rstrip("\r\n")

    def _skip_malformed(self, row: Any) -> str:
        self.malformed.append(
            RowError(
                None,
                None,
                "malformed_row",
                f"line {row.number}: {row.actual_columns} cells where the header has {row.expected_columns}",
                None,
            )
        )
        return "skip"

    def batches(self) -> Iterator[dict[str, list[str | None]]]:
        if self.kind == "parquet":
            for batch in self._parquet.iter_batches(batch_size=self.batch_rows):
                self.done += batch.num_rows
                yield {self.columns[i]: _cell_texts(batch.column(i)) for i in range(batch.num_columns)}
            return
        raw = pa.OSFile(str(self.path), "rb")
        stream: Any = pa.CompressedInputStream(raw, "gzip") if self.path.name.lower().endswith(".gz") else raw
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=1 << 20, encoding="utf8"),
            parse_options=pacsv.ParseOptions(
                delimiter=self.delimiter, newlines_in_values=True, invalid_row_handler=self._skip_malformed
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in self._raw_names},
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
                null_values=[""],
            ),
        )
        try:
            for batch in reader:
                self.done = raw.tell()
                yield {self.columns[i]: _cell_texts(batch.column(i)) for i in range(batch.num_columns)}
        finally:
            raw.close()


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rows = int(task.fields.get("rows", 0))
        elapsed = task.elapsed or 0.0
        rate = rows / elapsed if elapsed > 0 else 0.0
        return Text(f"{rows:,} rows  {rate:,.0f} rows/s", style="progress.data.speed")


def _check_columns(columns: list[str]) -> None:
    if "external_id" not in columns:
        raise AppError("missing_column", "The file needs an external_id column", field="external_id")
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise AppError("duplicate_column", f"Column {name!r} appears twice", field=name)
        seen.add(name)
        if name not in COLUMNS and not (
            name.startswith(ATTRIBUTE_PREFIX) and len(name) > len(ATTRIBUTE_PREFIX)
        ):
            raise AppError(
                "unknown_column",
                f"Unknown column {name!r}: expected {', '.join(COLUMNS)} or attr_<code>",
                field=name,
            )


class _Report:
    """The error report, opened at the first bad row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: io.TextIOWrapper | None = None
        self._writer: Any = None

    def write(self, errors: Iterable[RowError]) -> None:
        for error in errors:
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = self.path.open("w", encoding="utf-8", newline="")
                self._writer = csv.writer(self._handle)
                self._writer.writerow(REPORT_COLUMNS)
            self._writer.writerow(
                (
                    "" if error.row is None else error.row,
                    error.external_id or "",
                    error.code,
                    error.message,
                    error.field or "",
                )
            )

    @property
    def written(self) -> bool:
        return self._writer is not None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


@dataclass(slots=True, frozen=True)
class AttributeRule:
    """What a custom attribute accepts (a detached copy of its ``AttributeDefinition``)."""

    code: str
    type: str
    required: bool
    choices: list[str] | None
    constraints: dict[str, Any]


def load_attribute_rules(db: Database) -> dict[str, AttributeRule]:
    with db.reading() as session:
        return {
            d.code: AttributeRule(d.code, d.type, d.required, d.choices, dict(d.constraints or {}))
            for d in session.scalars(select(AttributeDefinition))
        }


def import_members_file(
    db: Database,
    path: Path | str,
    *,
    report_path: Path | str | None = None,
    batch_size: int = 5000,
    console: Console | None = None,
    region: str = "RU",
) -> ImportResult:
    """Imports a member file; bad rows go to ``report_path`` (default ``<file>.errors.csv``).

    Raises :class:`AppError` only when the file as a whole cannot be read (unknown format,
    unknown column, no external_id column); a bad row never stops the import.
    """
    if batch_size < 1:
        raise AppError("invalid_batch_size", "batch_size is at least 1", field="batch_size")
    path = Path(path)
    source = _Source(path, batch_size)
    _check_columns(source.columns)
    report = _Report(
        Path(report_path) if report_path is not None else path.with_name(path.name + ".errors.csv")
    )
    definitions = load_attribute_rules(db)
    parser = RowParser(source.columns, definitions, region=region)
    writer = MemberWriter(db, required_attributes=[d.code for d in definitions.values() if d.required])
    order = [*COLUMNS, *(name for name, _ in parser.attribute_columns)]
    seen = _SeenKeys()
    result = ImportResult()
    started = time.perf_counter()

    progress = Progress(
        TextColumn("[bold]importing[/bold] {task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )
    # The writer works on one batch in a thread while this one reads and checks the next:
    # SQLite and psycopg release the GIL while the database works.
    records: list[MemberRecord] = []
    errors: list[RowError] = []
    in_flight: tuple[Future[BatchOutcome] | None, list[RowError]] | None = None

    def settle() -> None:
        """Waits for the batch in flight; counts it and reports its bad rows in row order."""
        nonlocal in_flight
        if in_flight is None:
            return
        future, bad = in_flight
        in_flight = None
        if future is not None:
            outcome = future.result()
            result.inserted += outcome.inserted
            result.updated += outcome.updated
            result.unchanged += outcome.unchanged
            bad.extend(outcome.errors)
        if bad:
            bad.sort(key=lambda e: (e.row is None, e.row or 0))
            result.errors += len({(e.row, e.message if e.row is None else "") for e in bad})
            report.write(bad)

    def hand_over(pool: ThreadPoolExecutor) -> None:
        nonlocal records, errors, in_flight
        errors.extend(source.malformed)
        source.malformed.clear()
        settle()
        in_flight = (pool.submit(writer.write, records) if records else None, errors)
        records, errors = [], []

    row = 0
    try:
        with progress, ThreadPoolExecutor(max_workers=1, thread_name_prefix="member-import") as pool:
            task = progress.add_task(path.name, total=source.total, rows=0)
            for columns in source.batches():
                count = len(next(iter(columns.values()))) if columns else 0
                cells = zip(*(columns.get(name) or repeat(None, count) for name in order), strict=True)
                for values in cells:
                    row += 1
                    parsed = parser.parse(row, values)
                    if isinstance(parsed, list):
                        errors.extend(parsed)
                    elif hash(parsed.external_id) in seen:
                        errors.append(
                            RowError(
                                row,
                                parsed.external_id,
                                "duplicate_identifier",
                                f"external_id {parsed.external_id} appears more than once in the file",
                                "external_id",
                            )
                        )
                    else:
                        records.append(parsed)
                    if values[0] is not None:
                        seen.add(hash(values[0]))
                    if len(records) >= batch_size:
                        hand_over(pool)
                        progress.update(task, completed=source.done, rows=row)
                progress.update(task, completed=source.done, rows=row)
            hand_over(pool)
            settle()
            progress.update(task, completed=source.total, rows=row)
    finally:
        report.close()
        writer.close()
    result.rows = row
    result.seconds = time.perf_counter() - started
    result.report_path = report.path if report.written else None
    if console is not None:
        line = (
            f"[bold]{result.rows:,}[/bold] rows in {result.seconds:.1f} s "
            f"({result.rows_per_second:,.0f} rows/s): [green]{result.inserted:,} inserted[/green], "
            f"{result.updated:,} updated, {result.unchanged:,} unchanged, "
            f"[{'red' if result.errors else 'green'}]{result.errors:,} errors[/]"
        )
        if result.report_path is not None:
            line += f" → {result.report_path}"
        console.print(line)
    return result
