"""Writing events to the outbox, inside the caller's transaction.

Services call :func:`emit` with the session that makes the change, so the event exists if
and only if the change committed. The dispatcher (``events.dispatcher``) publishes later.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import OutboxEvent
from omniloyal.kernel.clock import utcnow


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
    now = utcnow()
    rows = [
        {
            "event_id": e.id,
            "type": e.type,
            "member_id": e.member_id,
            "payload": e.to_json(),
            "created_at": now,
            "attempts": 0,
        }
        for e in events
    ]
    if rows:
        session.execute(insert(OutboxEvent), rows)
    return len(rows)
