"""Engine and sessions for the operational store (SQLite in WAL mode, or PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic_core import from_json, to_json
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from omniloyal.db import refcache  # noqa: F401  (registers its engine listeners)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Writers take the lock at BEGIN, so two writers never deadlock on a lock upgrade;
    # the busy timeout then queues them. Read-only sessions begin deferred: in WAL mode
    # they never wait for a writer.
    if conn.get_execution_options().get("omniloyal_readonly"):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _json_text(value: Any) -> str:
    # pydantic-core's serialiser: several times faster than json.dumps on the JSON columns a
    # purchase writes (about thirty per cheque: the operation, its lines, ledger details).
    return to_json(value).decode()


def make_engine(url: str, **kwargs: Any) -> Engine:
    kwargs.setdefault("json_serializer", _json_text)
    kwargs.setdefault("json_deserializer", from_json)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
            pool_size=20,
            max_overflow=20,
            **kwargs,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True, **kwargs)


class Database:
    """The operational store: one engine, one session factory."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=True)
        self._read_sessions = sessionmaker(
            self.engine.execution_options(omniloyal_readonly=True), expire_on_commit=False
        )
        # SQLite has one writer at a time. Queuing this process's writers on a lock (FIFO-ish,
        # no sleeping) instead of SQLite's busy handler, which polls with sleeps of up to 100 ms,
        # keeps the till's tail latency flat under concurrent requests. Re-entrant so a service
        # that opens a transaction inside another fails the same way it would without the lock.
        self._writer: threading.RLock | None = threading.RLock() if self.dialect == "sqlite" else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commits when the block ends, rolls back on any exception."""
        if self._writer is None:
            with self.sessions() as session, session.begin():
                yield session
            return
        with self._writer, self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only; nothing it does is committed."""
        with self._read_sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    def dispose(self) -> None:
        self.engine.dispose()
