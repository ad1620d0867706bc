"""Shared by the bus tests: the RabbitMQ under test, unique names per run, outbox readers."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from omniloyal.db.engine import Database
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import OutboxEvent

RABBIT_URL = os.environ.get("OMNILOYAL_TEST_BUS_URL", "amqp://guest:guest@127.0.0.1:5672/")
REQUIRE_SERVICES = os.environ.get("OMNILOYAL_REQUIRE_SERVICES") == "1"


def rabbit_unavailable(url: str = RABBIT_URL) -> str | None:
    import pika

    try:
        params = pika.URLParameters(url)
        params.socket_timeout = 3
        params.connection_attempts = 1
        pika.BlockingConnection(params).close()
        return None
    except Exception as exc:  # the reason goes into the skip message
        return f"RabbitMQ not reachable at {url}: {exc.__class__.__name__}"


def require_rabbit() -> None:
    reason = rabbit_unavailable()
    if reason:
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason} (OMNILOYAL_REQUIRE_SERVICES=1)")
        pytest.skip(reason)


def unique_prefix() -> str:
    """Exchange and queue names of this test alone (parallel pytest workers share the broker)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"test.{worker}.{os.getpid()}.{uuid.uuid4().hex[:8]}."


def outbox(db: Database, type: str | None = None) -> list[EventEnvelope]:
    with db.reading() as session:
        stmt = select(OutboxEvent.payload).order_by(OutboxEvent.seq)
        if type is not None:
            stmt = stmt.where(OutboxEvent.type == type)
        return [EventEnvelope.model_validate(p) for p in session.scalars(stmt)]


def one(db: Database, type: str) -> dict[str, Any]:
    """The only event of ``type`` in the outbox, as JSON."""
    events = outbox(db, type)
    assert len(events) == 1, [e.id for e in events]
    return events[0].to_json()
