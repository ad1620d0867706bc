"""A broker outage mid-stream loses nothing and duplicates nothing.

The machine's RabbitMQ keeps running (other tests use it): a small TCP proxy sits between the
bus and the broker, and the test cuts it (every connection closed, new ones refused) while
events are being written, then restores it. Every event must then have reached each of two
consumers exactly once: deliveries may repeat, effects may not (``consumed_events``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.orm import Session

from omniloyal.db.engine import Database
from omniloyal.events.bus.rabbitmq import RabbitMQBus
from omniloyal.events.consumers import Registry, Runtime, idempotent
from omniloyal.events.dispatcher import outbox_status
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.outbox import emit
from omniloyal.settings import Settings
from tests.events.bus_helpers import RABBIT_URL, require_rabbit, unique_prefix

EVENTS = 600
CONSUMERS = ("sink", "features")


class Proxy:
    """Forwards 127.0.0.1:<port> to the broker; ``cut()`` drops everything, ``restore()`` heals."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.connections = 0
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not on Linux
            # (and the listening socket would keep accepting).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)

    def url(self, base: str) -> str:
        parts = urlsplit(base)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))


effects = Table(
    "bus_test_effects",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("consumer", String(50)),
    Column("event_id", String(200)),
)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    require_rabbit()
    target = urlsplit(RABBIT_URL)
    proxy = Proxy((target.hostname or "127.0.0.1", target.port or 5672))
    yield proxy
    proxy.cut()


@pytest.fixture
def effects_table(db: Database) -> Iterator[None]:
    effects.create(db.engine, checkfirst=True)
    with db.engine.begin() as conn:
        conn.execute(effects.delete())
    yield
    effects.drop(db.engine, checkfirst=True)


def test_broker_outage_mid_stream_every_event_reaches_each_consumer_exactly_once(
    db: Database, settings: Settings, proxy: Proxy, effects_table: None
) -> None:
    prefix = unique_prefix()
    bus = RabbitMQBus(proxy.url(RABBIT_URL), prefix=prefix, max_attempts=50)
    deliveries = dict.fromkeys(CONSUMERS, 0)
    registry = Registry()
    for name in CONSUMERS:

        def apply(session: Session, event: EventEnvelope, name: str = name) -> None:
            session.execute(insert(effects).values(consumer=name, event_id=event.id))

        handle = idempotent(db, name, apply)

        def counting(batch: list[EventEnvelope], name: str = name, handle: object = handle) -> None:
            deliveries[name] += len(batch)
            handle(batch)  # type: ignore[operator]

        registry.register(name, counting)
    runtime = Runtime(settings, db, registry=registry, bus=bus, poll_timeout=0.2, idle_interval=0.02)
    runtime.dispatcher.batch_size = 50
    runtime.dispatcher.max_backoff = 0.5
    written: list[str] = []

    def produce() -> None:
        for i in range(0, EVENTS, 10):
            with db.transaction() as session:
                for j in range(i, i + 10):
                    emit(session, f"outage:{j}", "purchase.confirmed", properties={"n": j})
                    written.append(f"outage:{j}")
            time.sleep(0.005)

    try:
        runtime.start()
        producer = threading.Thread(target=produce)
        producer.start()
        while len(written) < EVENTS // 3:
            time.sleep(0.01)
        proxy.cut()  # the broker is gone mid-stream
        cut_at = len(written)
        time.sleep(1.5)
        # Meanwhile events kept being written and wait in the outbox.
        assert runtime.dispatcher.failures > 0
        assert outbox_status(db).pending > 0
        proxy.restore()
        producer.join()
        assert cut_at < EVENTS and len(written) == EVENTS
        assert runtime.drain(timeout=60), outbox_status(db)
    finally:
        runtime.stop()
        bus.close()
        cleanup = RabbitMQBus(RABBIT_URL, prefix=prefix)
        cleanup.destroy(CONSUMERS)
    assert proxy.connections > 2  # the bus reconnected after the cut
    with db.reading() as session:
        for name in CONSUMERS:
            rows = session.execute(
                select(effects.c.event_id, func.count())
                .where(effects.c.consumer == name)
                .group_by(effects.c.event_id)
            ).all()
            counts = dict(rows)
            assert set(counts) == set(written), name  # every event reached the consumer
            assert set(counts.values()) == {1}, name  # exactly once
            assert deliveries[name] >= EVENTS
