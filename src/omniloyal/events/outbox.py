"""Writing events to the outbox, inside the caller's transaction.

Services call :func:`emit` with the session that makes the change, so the event exists if
and only if the change committed. The dispatcher (``events.dispatcher``) publishes later.

The payload is the envelope serialised once, by Pydantic straight to JSON text, and inserted
with one executemany per call (no ORM unit of work, no ``to_json()`` + ``json.dumps`` round).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import OutboxEvent
from omniloyal.kernel.clock import utcnow

# One outbox row ready to insert: (event id, type, member id, the envelope as JSON text).
OutboxRow = tuple[str, str, int | None, str | bytes]

_TABLE = OutboxEvent.__table__
_COLUMNS = "event_id, type, member_id, payload, created_at, attempts"
# Straight to the driver's executemany: SQLAlchemy's per-row parameter processing would cost
# more than the insert itself. SQLite keeps JSON as text; PostgreSQL casts the text to jsonb.
_SQL = {
    "sqlite": f"INSERT INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0)",
    "postgresql": f"INSERT INTO outbox ({_COLUMNS}) VALUES (%s, %s, %s, %s::jsonb, %s, 0)",
}


def _stored_time(dialect: Dialect, value: datetime) -> Any:
    """``value`` as the ``created_at`` column stores it on this dialect (what the column's type
    would bind)."""
    process = _TABLE.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
    return process(value) if process is not None else value


def envelope(
    event_id: str,
    type: str,
    *,
    member_id: int | None = None,
    occurred_at: datetime | None = None,
    source: str = "loyalty",
    store: str | None = None,
    properties: dict[str, Any] | None = None,
    anonymous_id: str | None = None,
    utm: dict[str, str] | None = None,
) -> EventEnvelope:
    now = utcnow()
    return EventEnvelope(
        id=event_id,
        type=type,
        occurred_at=occurred_at or now,
        received_at=now,
        member_id=member_id,
        anonymous_id=anonymous_id,
        source=source,
        store=store,
        properties=properties or {},
        utm=utm or {},
    )


def emit(session: Session, event_id: str, type: str, **fields: Any) -> EventEnvelope:
    """Record one loyalty change as an event in the caller's transaction."""
    event = envelope(event_id, type, **fields)
    emit_many(session, [event])
    return event


def emit_many(session: Session, events: Iterable[EventEnvelope]) -> int:
    """Bulk form (ingest, imports): one INSERT for the batch. Ids must be new to the outbox."""
    return emit_rows(session, [(e.id, e.type, e.member_id, e.model_dump_json()) for e in events])


def emit_rows(session: Session, rows: Sequence[OutboxRow]) -> int:
    """Envelopes already serialised (``EventEnvelope.model_dump_json()``, or the same JSON
    built otherwise): one executemany in the caller's transaction. Ids must be new."""
    if not rows:
        return 0
    if session.autoflush:  # as an ORM insert would: the caller's pending changes go first
        session.flush()
    connection = session.connection()
    dialect = connection.dialect
    created_at = _stored_time(dialect, utcnow())
    connection.exec_driver_sql(
        _SQL.get(dialect.name, _SQL["sqlite"]),
        [
            (event_id, type, member_id, payload if isinstance(payload, str) else payload.decode(), created_at)
            for event_id, type, member_id, payload in rows
        ],
    )
    return len(rows)
