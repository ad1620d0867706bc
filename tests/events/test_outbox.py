"""The outbox: written with the change, dispatched in order, kept while the bus is down,
shared by several dispatchers, purged once old; the runtime and the idempotent consumers."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from omniloyal.db.engine import Database
from omniloyal.events.bus import BusUnavailable
from omniloyal.events.bus.memory import MemoryBus
from omniloyal.events.consumers import Registry, Runtime, idempotent
from omniloyal.events.dispatcher import Dispatcher, outbox_status, pending_count, purge_published
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import ConsumedEvent, OutboxEvent
from omniloyal.events.outbox import emit
from omniloyal.kernel.clock import utcnow
from omniloyal.settings import Settings


class RecordingBus(MemoryBus):
    """Keeps what was published; can be told to fail after some messages."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []
        self.fail_after: int | None = None
        self.delay = 0.0
        self.lock = threading.Lock()

    def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.fail_after is not None:
                taken = list(envelopes[: self.fail_after])
                self.sent.extend(e.id for e in taken)
                raise BusUnavailable("broker down", published=len(taken))
            self.sent.extend(e.id for e in envelopes)


def write(db: Database, n: int, prefix: str = "e", type: str = "member.updated") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    with db.transaction() as session:
        for event_id in ids:
            emit(session, event_id, type, member_id=None, properties={"id": event_id})
    return ids


def test_the_event_exists_only_if_the_change_committed(db: Database) -> None:
    write(db, 1, "kept")
    with pytest.raises(RuntimeError), db.transaction() as session:
        emit(session, "lost", "member.updated")
        raise RuntimeError("the change failed")
    with db.reading() as session:
        assert list(session.scalars(select(OutboxEvent.event_id))) == ["kept0"]


def test_dispatcher_publishes_in_order_and_stamps(db: Database) -> None:
    ids = write(db, 12)
    bus = RecordingBus()
    dispatcher = Dispatcher(db, bus, batch_size=5)
    assert [dispatcher.run_once() for _ in range(4)] == [5, 5, 2, 0]
    assert bus.sent == ids
    status = outbox_status(db)
    assert status.pending == 0 and status.published == 12 and status.oldest_pending_at is None


def test_bus_down_keeps_events_pending_then_they_flow(db: Database) -> None:
    ids = write(db, 6)
    bus = RecordingBus()
    bus.fail_after = 2  # the broker confirmed two, then went away
    dispatcher = Dispatcher(db, bus, batch_size=10)
    with pytest.raises(BusUnavailable):
        dispatcher.run_once()
    assert pending_count(db) == 4
    bus.fail_after = 0
    with pytest.raises(BusUnavailable):
        dispatcher.run_once()
    status = outbox_status(db)
    assert status.pending == 4 and status.max_attempts == 2
    assert status.oldest_pending_age() is not None
    bus.fail_after = None
    assert dispatcher.run_once() == 4
    assert bus.sent == ids  # nothing lost, nothing twice, in order
    assert pending_count(db) == 0


def test_rows_published_by_someone_else_keep_their_stamp_and_the_rest_flow(db: Database) -> None:
    # A row in the middle already published (another dispatcher claimed it): the batch around
    # it is published and stamped, that row is neither sent again nor stamped again.
    ids = write(db, 6)
    earlier = utcnow() - timedelta(hours=1)
    with db.transaction() as session:
        session.execute(
            update(OutboxEvent).where(OutboxEvent.event_id == ids[2]).values(published_at=earlier),
            execution_options={"synchronize_session": False},
        )
    bus = RecordingBus()
    assert Dispatcher(db, bus, batch_size=10).run_once() == 5
    assert bus.sent == ids[:2] + ids[3:]
    with db.reading() as session:
        stamps = {i: at for i, at in session.execute(select(OutboxEvent.event_id, OutboxEvent.published_at))}
    assert stamps[ids[2]] == earlier
    assert all(stamps[i] is not None and stamps[i] > earlier for i in ids if i != ids[2])


def test_dispatcher_loop_backs_off_and_recovers(db: Database) -> None:
    write(db, 3)
    bus = RecordingBus()
    bus.fail_after = 0
    dispatcher = Dispatcher(db, bus, idle_interval=0.01, min_backoff=0.01, max_backoff=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while dispatcher.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dispatcher.failures >= 3 and pending_count(db) == 3
        bus.fail_after = None
        while pending_count(db) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pending_count(db) == 0 and bus.sent == ["e0", "e1", "e2"]
    finally:
        stop.set()
        thread.join()


def test_several_dispatchers_share_the_outbox_without_duplicates(db: Database) -> None:
    if db.dialect != "postgresql":
        pytest.skip("row claiming (FOR UPDATE SKIP LOCKED) is PostgreSQL's; SQLite runs one dispatcher")
    ids = write(db, 400)
    bus = RecordingBus()
    bus.delay = 0.01  # publishing takes a while: the dispatchers overlap
    stop = threading.Event()
    dispatchers = [Dispatcher(db, bus, batch_size=20, idle_interval=0.01) for _ in range(3)]
    threads = [threading.Thread(target=d.run, args=(stop,)) for d in dispatchers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while pending_count(db) and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    for thread in threads:
        thread.join()
    assert sorted(bus.sent) == sorted(ids) and len(bus.sent) == len(set(bus.sent))
    assert all(d.published > 0 for d in dispatchers)  # they really shared the work


def test_retention_deletes_only_old_published_rows(db: Database) -> None:
    write(db, 3, "old")
    Dispatcher(db, RecordingBus()).run_once()
    with db.transaction() as session:
        session.execute(update(OutboxEvent).values(published_at=utcnow() - timedelta(days=10)))
    write(db, 2, "recent")
    Dispatcher(db, RecordingBus()).run_once()
    write(db, 1, "pending")
    with db.transaction() as session:  # pending for a long time: still never deleted
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.published_at.is_(None))
            .values(created_at=utcnow() - timedelta(days=30))
        )
    assert purge_published(db, timedelta(days=7), chunk=2) == 3
    with db.reading() as session:
        left = set(session.scalars(select(OutboxEvent.event_id)))
    assert left == {"recent0", "recent1", "pending0"}


def test_idempotent_handler_applies_each_event_once(db: Database) -> None:
    applied: list[str] = []

    def handle(session: object, event: EventEnvelope) -> None:
        applied.append(event.id)

    handler = idempotent(db, "counter", handle)  # type: ignore[arg-type]
    batch = [EventEnvelope.model_validate(e) for e in _payloads(db, write(db, 3))]
    handler(batch)
    handler(batch[1:] + batch[:1])  # redelivered, reordered
    handler([batch[0], batch[0]])  # duplicated inside a batch
    assert applied == ["e0", "e1", "e2"]
    with db.reading() as session:
        assert session.scalar(select(func.count()).select_from(ConsumedEvent)) == 3


def test_idempotent_handler_failure_records_nothing(db: Database) -> None:
    def handle(session: object, event: EventEnvelope) -> None:
        if event.id == "e1":
            raise ValueError("bad")

    handler = idempotent(db, "strict", handle)  # type: ignore[arg-type]
    batch = [EventEnvelope.model_validate(e) for e in _payloads(db, write(db, 2))]
    with pytest.raises(ValueError):
        handler(batch)
    with db.reading() as session:
        assert session.scalar(select(func.count()).select_from(ConsumedEvent)) == 0


def _payloads(db: Database, ids: list[str]) -> list[dict[str, object]]:
    with db.reading() as session:
        rows = session.execute(
            select(OutboxEvent.event_id, OutboxEvent.payload).where(OutboxEvent.event_id.in_(ids))
        ).all()
    by_id = dict(rows)
    return [by_id[i] for i in ids]


def test_runtime_delivers_to_every_consumer_and_drains(db: Database, settings: Settings) -> None:
    registry = Registry()
    seen: dict[str, list[str]] = {"all": [], "cards": []}
    registry.register("all", lambda batch: seen["all"].extend(e.id for e in batch))
    registry.register("cards", lambda batch: seen["cards"].extend(e.id for e in batch), types=["card.*"])
    runtime = Runtime(settings, db, registry=registry, bus=MemoryBus(), poll_timeout=0.05, idle_interval=0.02)
    with runtime:
        members = write(db, 20, "m")
        cards = write(db, 5, "c", type="card.blocked")
        assert runtime.drain(timeout=10)
        assert seen["all"] == members + cards
        assert seen["cards"] == cards
        more = write(db, 3, "later")
        assert runtime.drain(timeout=10)
        assert seen["all"][-3:] == more
    assert not runtime.started and pending_count(db) == 0
