"""Named consumers of the event stream, and the runtime that runs them with the dispatcher.

A consumer is a name, a handler taking a batch (``list[EventEnvelope]``) and the event types
it wants (topic patterns, ``#`` = everything)::

    from omniloyal.events import consumers

    consumers.register("welcome", send_welcome, types=("member.registered",))
    # or, when the handler needs the database or the settings:
    consumers.register_factory("warehouse", lambda settings, db: Sink(settings, db).handle)

Deliveries may repeat (at least once), so a handler must be idempotent on the event id. One
with a natural unique key (an upsert by id) is; for the others ``idempotent(db, name, handle)``
records each handled id in ``consumed_events`` in the same transaction as the handler's own
writes, so a redelivered event changes nothing.

``register_job(name, consumer=..., interval=..., factory=...)`` attaches scheduled work to a
consumer (``omniloyal.events.schedule``): it runs wherever that consumer runs.

``Runtime(settings, db).start()`` subscribes every registered consumer, then runs the outbox
dispatcher, one thread per consumer and one per scheduled job until ``stop()``; ``drain()`` waits
until everything written so far has been handled (tests, graceful shutdown).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from omniloyal.db.engine import Database
from omniloyal.events.bus import Bus, BusUnavailable, Handler, bus_from_url
from omniloyal.events.dispatcher import (
    DEFAULT_BATCH,
    DEFAULT_RETENTION_DAYS,
    Dispatcher,
    pending_count,
    purge_published,
)
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import ConsumedEvent
from omniloyal.events.schedule import Job, JobFactory, run_if_due
from omniloyal.kernel.clock import utcnow
from omniloyal.settings import Settings

log = logging.getLogger("omniloyal.consumers")

HandlerFactory = Callable[[Settings, Database], Handler]

# Modules whose import registers the platform's own consumers (warehouse sink, features,
# triggers...): ``Runtime`` imports them before starting.
# Modules whose import registers their consumers (the marketing side registers itself here).
CONSUMER_MODULES: list[str] = ["omniloyal.analytics.sink", "omniloyal.segments.freshness"]


@dataclass(frozen=True)
class Consumer:
    name: str
    types: tuple[str, ...]
    handler: Handler | None = None
    factory: HandlerFactory | None = None

    def build(self, settings: Settings, db: Database) -> Handler:
        if self.handler is not None:
            return self.handler
        assert self.factory is not None
        return self.factory(settings, db)


class Registry:
    def __init__(self) -> None:
        self._consumers: dict[str, Consumer] = {}
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def _add(self, consumer: Consumer) -> Consumer:
        if not consumer.name or not consumer.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"consumer name {consumer.name!r}: letters, digits, '_' and '-' only")
        if not consumer.types:
            raise ValueError(f"consumer {consumer.name!r} wants no event types")
        with self._lock:
            self._consumers[consumer.name] = consumer
        return consumer

    def register(self, name: str, handler: Handler, types: Sequence[str] = ("#",)) -> Consumer:
        """Registers (or replaces) the consumer ``name``."""
        return self._add(Consumer(name, tuple(types), handler=handler))

    def register_factory(self, name: str, factory: HandlerFactory, types: Sequence[str] = ("#",)) -> Consumer:
        """Like ``register``, the handler being built by ``factory(settings, db)`` when the runtime starts."""
        return self._add(Consumer(name, tuple(types), factory=factory))

    def unregister(self, name: str) -> None:
        with self._lock:
            self._consumers.pop(name, None)

    def get(self, name: str) -> Consumer:
        with self._lock:
            return self._consumers[name]

    def all(self) -> list[Consumer]:
        with self._lock:
            return list(self._consumers.values())

    def register_job(
        self, name: str, *, consumer: str, interval: Callable[[Settings], float], factory: JobFactory
    ) -> Job:
        """Registers (or replaces) the scheduled job ``name``, run where ``consumer`` runs
        (see ``omniloyal.events.schedule``)."""
        job = Job(name, consumer, interval, factory)
        with self._lock:
            self._jobs[name] = job
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())


registry = Registry()


def register(name: str, handler: Handler, types: Sequence[str] = ("#",)) -> Consumer:
    return registry.register(name, handler, types)


def register_factory(name: str, factory: HandlerFactory, types: Sequence[str] = ("#",)) -> Consumer:
    return registry.register_factory(name, factory, types)


def register_job(
    name: str, *, consumer: str, interval: Callable[[Settings], float], factory: JobFactory
) -> Job:
    return registry.register_job(name, consumer=consumer, interval=interval, factory=factory)


def load_consumer_modules(modules: Iterable[str] = ()) -> None:
    for module in [*CONSUMER_MODULES, *modules]:
        importlib.import_module(module)


# ---------------------------------------------------------------- idempotency


def idempotent(db: Database, consumer: str, handle: Callable[[Session, EventEnvelope], None]) -> Handler:
    """A batch handler running ``handle(session, event)`` for each event the consumer has not
    handled yet, recording its id in ``consumed_events``, all in one transaction per batch:
    the effects and the record commit together, so a redelivered event is skipped. Two workers
    racing on the same event: one commits, the other's batch fails on the primary key and is
    delivered again, then skipped."""

    def handler(events: list[EventEnvelope]) -> None:
        unique = list({e.id: e for e in events}.values())
        with db.transaction() as session:
            seen = set(
                session.scalars(
                    select(ConsumedEvent.event_id).where(
                        ConsumedEvent.consumer == consumer,
                        ConsumedEvent.event_id.in_([e.id for e in unique]),
                    )
                )
            )
            now = utcnow()
            for event in unique:
                if event.id in seen:
                    continue
                handle(session, event)
                session.add(ConsumedEvent(consumer=consumer, event_id=event.id, consumed_at=now))
            session.flush()

    return handler


def forget_consumed(db: Database, consumer: str, older_than: timedelta) -> int:
    """Deletes ``consumed_events`` records older than ``older_than`` (keep them longer than
    any redelivery can take: the outbox retention is a good lower bound)."""
    from sqlalchemy import delete

    with db.transaction() as session:
        result = session.execute(
            delete(ConsumedEvent).where(
                ConsumedEvent.consumer == consumer, ConsumedEvent.consumed_at < utcnow() - older_than
            ),
            execution_options={"synchronize_session": False},
        )
        return int(getattr(result, "rowcount", 0) or 0)


# ---------------------------------------------------------------- runtime


@dataclass
class _Worker:
    consumer: Consumer
    handler: Handler
    thread: threading.Thread | None = None
    # True while the handler runs (a batch received and not yet acknowledged).
    busy: bool = False
    # Polls that found the queue empty, and when the last one began (for ``drain``).
    empty_polls: int = 0
    last_empty_poll_started: float = 0.0
    handled: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


_started: weakref.WeakSet[Runtime] = weakref.WeakSet()


def started_runtimes() -> list[Runtime]:
    """The runtimes running in this process (what ``serve`` or ``worker`` started), e.g. for a
    probe or a benchmark that waits for them to drain."""
    return [runtime for runtime in list(_started) if runtime.started]


class Runtime:
    """The dispatcher and every registered consumer, in background threads of this process."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        registry: Registry | None = None,
        bus: Bus | None = None,
        consumers: Sequence[str] | None = None,
        dispatch: bool = True,
        batch_size: int = DEFAULT_BATCH,
        # Sinks pay a fixed cost per batch (a warehouse transaction of about ten statements,
        # ~20 ms on DuckDB): a consumer that falls behind catches up with bigger batches.
        # (RabbitMQ: also the prefetch.)
        consumer_batch: int = 2000,
        poll_timeout: float = 0.5,
        linger: float | None = None,
        idle_interval: float = 0.1,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        retention_interval: float = 3600.0,
        # How often scheduled jobs look whether their round is due (at most their interval).
        schedule_check: float = 60.0,
    ) -> None:
        self.settings = settings
        self.db = db
        self.registry = registry if registry is not None else globals()["registry"]
        self._own_bus = bus is None
        self.bus: Bus = bus if bus is not None else bus_from_url(settings.bus_url)
        self.only = set(consumers) if consumers is not None else None
        self.dispatch = dispatch
        self.consumer_batch = consumer_batch
        self.poll_timeout = poll_timeout
        self.linger = settings.consumer_linger_ms / 1000 if linger is None else linger
        self.retention_days = retention_days
        self.retention_interval = retention_interval
        self.schedule_check = schedule_check
        self.dispatcher = Dispatcher(db, self.bus, batch_size=batch_size, idle_interval=idle_interval)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.workers: dict[str, _Worker] = {}
        self.started = False

    def start(self) -> None:
        """Subscribes the consumers, then starts their threads and the dispatcher's. Never
        waits for the broker: workers connect (and reconnect) on their own."""
        if self.started:
            return
        if self.registry is globals()["registry"]:
            load_consumer_modules()
        for consumer in self.registry.all():
            if self.only is not None and consumer.name not in self.only:
                continue
            self.bus.subscribe(consumer.name, consumer.types)
            self.workers[consumer.name] = _Worker(consumer, consumer.build(self.settings, self.db))
        self._stop.clear()
        for worker in self.workers.values():
            worker.thread = self._spawn(f"omniloyal-consumer-{worker.consumer.name}", self._consume, worker)
        for job in self.registry.jobs():
            interval = job.interval(self.settings)
            if job.consumer in self.workers and interval > 0:
                self._spawn(f"omniloyal-job-{job.name}", self._scheduled, job, interval)
        if self.dispatch:
            self._spawn("omniloyal-dispatcher", self.dispatcher.run, self._stop)
            self._spawn("omniloyal-outbox-retention", self._retention)
        self.started = True
        _started.add(self)
        log.info("events runtime started: %d consumers on %s", len(self.workers), type(self.bus).__name__)

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _consume(self, worker: _Worker) -> None:
        backoff = 0.2
        name = worker.consumer.name

        def handler(events: list[EventEnvelope]) -> None:
            worker.busy = True
            try:
                worker.handler(events)
            finally:
                worker.busy = False

        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = self.bus.consume(
                    name,
                    handler,
                    max_batch=self.consumer_batch,
                    timeout=self.poll_timeout,
                    linger=self.linger,
                )
            except BusUnavailable as exc:
                if self._stop.is_set():
                    break
                log.warning("consumer %s: bus unavailable, retry in %.1fs: %s", name, backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            except Exception as exc:  # a bug in the bus layer must not end the worker silently
                worker.errors.append(repr(exc))
                log.exception("consumer %s: unexpected error, retry in %.1fs", name, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            worker.handled += result.received - result.failed
            worker.failed += result.failed
            if result.received == 0:
                worker.last_empty_poll_started = started
                worker.empty_polls += 1
            if result.failed:
                # Retry later rather than burn the attempts of a transient failure at once.
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            else:
                backoff = 0.2

    def _scheduled(self, job: Job, interval: float) -> None:
        run = job.factory(self.settings, self.db)
        while True:
            try:
                run_if_due(self.db, job, run, interval)
            except Exception:  # the claim itself failed (store unreachable): try next round
                log.exception("scheduled job %s: could not claim its round", job.name)
            if self._stop.wait(min(interval, self.schedule_check)):
                return

    def _retention(self) -> None:
        while not self._stop.wait(self.retention_interval):
            try:
                purged = purge_published(self.db, timedelta(days=self.retention_days))
                if purged:
                    log.info(
                        "outbox retention: %d published events older than %d days deleted",
                        purged,
                        self.retention_days,
                    )
            except Exception:
                log.exception("outbox retention failed; retry next round")

    def drain(self, timeout: float = 10.0) -> bool:
        """Waits until the outbox has nothing pending and every consumer, polling after that,
        found its queue empty: every event written before the call has been handled (or
        dead-lettered). Returns False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        mark: float | None = None
        while time.monotonic() < deadline:
            if self.dispatch and pending_count(self.db) > 0:
                mark = None
            elif mark is None:
                mark = time.monotonic()
            elif all(w.last_empty_poll_started >= mark and not w.busy for w in self.workers.values()):
                try:
                    waiting = sum(self.bus.pending(name) for name in self.workers)
                except BusUnavailable:
                    waiting = -1
                if waiting == 0 and (not self.dispatch or pending_count(self.db) == 0):
                    return True
                mark = None  # something arrived meanwhile (a handler may emit events): go again
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stops every thread (a batch being handled is finished first; a waiting poll ends
        within ``poll_timeout``), then closes the bus if the runtime opened it."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("threads still running after stop: %s", ", ".join(alive))
        self._threads.clear()
        if self._own_bus:
            self.bus.close()
        self.started = False
        _started.discard(self)

    def __enter__(self) -> Runtime:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
