"""The outbox dispatcher: publishes what services wrote to the outbox, in ``seq`` order.

A row is stamped ``published_at`` only after the bus confirmed it. When the bus refuses
(``BusUnavailable``) the rows stay pending with ``attempts`` incremented and the dispatcher
backs off (doubling up to ``max_backoff``), then tries again: nothing is lost while the broker
is down, and everything flows, in order, when it is back.

On PostgreSQL a batch is claimed with ``FOR UPDATE SKIP LOCKED`` inside the transaction that
stamps it, so any number of dispatchers (one per worker process) share the outbox without
publishing a row twice in the normal case. On SQLite (one process) the batch is read without a
lock and stamped in a short write transaction afterwards, so the database's single writer lock
is never held while waiting for the broker; a second dispatcher there would at worst publish a
row twice, which consumers, idempotent on the event id, ignore.

Delivery is at least once: a crash between the broker's confirm and the stamp publishes the
batch again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Text, cast, delete, func, select, update
from sqlalchemy.orm import Session

from omniloyal.db.engine import Database
from omniloyal.events.bus import Bus, BusUnavailable
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import OutboxEvent
from omniloyal.kernel.clock import utcnow

log = logging.getLogger("omniloyal.dispatcher")

# Outbox rows per publish: two short SQLite transactions per batch, so bigger batches cost less
# per event; the broker confirms a batch in one round trip.
DEFAULT_BATCH = 1000
DEFAULT_RETENTION_DAYS = 7


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    oldest_pending_at: datetime | None
    published: int
    # The most attempts any pending row has seen (0 while the bus is healthy).
    max_attempts: int

    def oldest_pending_age(self, now: datetime | None = None) -> timedelta | None:
        if self.oldest_pending_at is None:
            return None
        return (now or utcnow()) - self.oldest_pending_at


def outbox_status(db: Database) -> OutboxStatus:
    with db.reading() as session:
        pending, oldest, most = session.execute(
            select(func.count(), func.min(OutboxEvent.created_at), func.max(OutboxEvent.attempts)).where(
                OutboxEvent.published_at.is_(None)
            )
        ).one()
        published = session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_not(None))
        )
    return OutboxStatus(int(pending), oldest, int(published or 0), int(most or 0))


def pending_count(db: Database) -> int:
    with db.reading() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
            )
            or 0
        )


def purge_published(
    db: Database, older_than: timedelta, *, now: datetime | None = None, chunk: int = 10_000
) -> int:
    """Deletes rows published before ``now - older_than`` (in chunks, so no long lock); pending
    rows are never deleted, whatever their age. Returns how many went."""
    limit = (now or utcnow()) - older_than
    total = 0
    while True:
        with db.transaction() as session:
            seqs = list(
                session.scalars(
                    select(OutboxEvent.seq)
                    .where(OutboxEvent.published_at.is_not(None), OutboxEvent.published_at < limit)
                    .order_by(OutboxEvent.seq)
                    .limit(chunk)
                )
            )
            if seqs:
                session.execute(
                    delete(OutboxEvent).where(OutboxEvent.seq.in_(seqs)),
                    execution_options={"synchronize_session": False},
                )
        total += len(seqs)
        if len(seqs) < chunk:
            return total


# An outbox row on its way: seq, event id, type, and the envelope as the JSON text stored.
_Row = tuple[int, str, str, str]


def _pending(session: Session, batch_size: int, *, lock: bool) -> list[_Row]:
    # The payload is read as the JSON text it is: Pydantic validates it straight from the text
    # (half the cost of the JSON column's json.loads followed by model_validate), or a bus that
    # takes JSON (RabbitMQ) sends it as it is.
    stmt = (
        select(OutboxEvent.seq, OutboxEvent.event_id, OutboxEvent.type, cast(OutboxEvent.payload, Text))
        .where(OutboxEvent.published_at.is_(None))
        .order_by(OutboxEvent.seq)
        .limit(batch_size)
    )
    if lock:
        stmt = stmt.with_for_update(skip_locked=True)
    # On the connection: a plain Core result, without the ORM's row handling.
    rows = session.connection().execute(stmt)
    return [(seq, event_id, type, payload) for seq, event_id, type, payload in rows]


def _publish(bus: Bus, rows: Sequence[_Row]) -> None:
    publish_json = getattr(bus, "publish_json", None)
    if publish_json is not None:
        publish_json([(event_id, type, payload) for _, event_id, type, payload in rows])
    else:
        bus.publish([EventEnvelope.model_validate_json(payload) for *_, payload in rows])


def _rows(seqs: Sequence[int]) -> ColumnElement[bool]:
    """These rows: a range when the seqs follow each other (the usual batch: one bound pair
    instead of a parameter per row), else the list."""
    low, high = min(seqs), max(seqs)
    if high - low + 1 == len(set(seqs)):
        return OutboxEvent.seq.between(low, high)
    return OutboxEvent.seq.in_(seqs)


def _stamp(session: Session, seqs: Sequence[int]) -> None:
    if seqs:
        session.execute(
            update(OutboxEvent).where(_rows(seqs)).values(published_at=utcnow()),
            execution_options={"synchronize_session": False},
        )


def _failed(session: Session, seqs: Sequence[int]) -> None:
    if seqs:
        session.execute(
            update(OutboxEvent).where(_rows(seqs)).values(attempts=OutboxEvent.attempts + 1),
            execution_options={"synchronize_session": False},
        )


class Dispatcher:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int = DEFAULT_BATCH,
        idle_interval: float = 0.1,
        min_backoff: float = 0.2,
        max_backoff: float = 10.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.idle_interval = idle_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.published = 0
        self.failures = 0

    def run_once(self) -> int:
        """Publishes one batch; returns how many rows were published (0: nothing pending).
        Raises ``BusUnavailable`` after recording the attempt on the rows it could not publish."""
        if self.db.dialect == "postgresql":
            return self._claim_and_publish()
        return self._read_publish_stamp()

    def _claim_and_publish(self) -> int:
        error: BusUnavailable | None = None
        with self.db.transaction() as session:
            rows = _pending(session, self.batch_size, lock=True)
            if not rows:
                return 0
            try:
                _publish(self.bus, rows)
                done = len(rows)
            except BusUnavailable as exc:
                error, done = exc, exc.published
            _stamp(session, [row[0] for row in rows[:done]])
            _failed(session, [row[0] for row in rows[done:]])
        self.published += done
        if error is not None:
            raise error
        return done

    def _read_publish_stamp(self) -> int:
        with self.db.reading() as session:
            rows = _pending(session, self.batch_size, lock=False)
        if not rows:
            return 0
        error: BusUnavailable | None = None
        try:
            _publish(self.bus, rows)
            done = len(rows)
        except BusUnavailable as exc:
            error, done = exc, exc.published
        with self.db.transaction() as session:
            _stamp(session, [row[0] for row in rows[:done]])
            _failed(session, [row[0] for row in rows[done:]])
        self.published += done
        if error is not None:
            raise error
        return done

    def run(self, stop: threading.Event) -> None:
        """Loops until ``stop`` is set: publishes while there is work, polls every
        ``idle_interval`` when idle, backs off while the bus is unavailable."""
        backoff = self.min_backoff
        while not stop.is_set():
            try:
                published = self.run_once()
                backoff = self.min_backoff
            except BusUnavailable as exc:
                self.failures += 1
                log.warning("bus unavailable, events wait in the outbox; retry in %.1fs: %s", backoff, exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            except Exception:  # the database went away, a bad row...: keep the worker alive
                self.failures += 1
                log.exception("outbox dispatch failed; retry in %.1fs", backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if published < self.batch_size:
                stop.wait(self.idle_interval)
