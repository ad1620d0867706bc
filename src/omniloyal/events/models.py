"""Events received through the ingest API (member events run the offers engine on arrival)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from omniloyal.db.base import Base
from omniloyal.db.types import BigId, Json, UTCDateTime
from omniloyal.kernel.clock import utcnow


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_member", "member_id", "occurred_at"),)

    # The sender's id: a repeated event with the same id is harmless.
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(100), index=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True)
    anonymous_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    source: Mapped[str | None] = mapped_column(String(50), nullable=True)
    store_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    properties: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    # What processing the event did: points accrued by offers, offers applied.
    outcome: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)


class OutboxEvent(Base):
    """An event written in the same transaction as the change it describes; the dispatcher
    publishes it to the bus and stamps ``published_at``. Nothing is lost while the bus is down."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "published_at", "seq"),)

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(200), unique=True)
    type: Mapped[str] = mapped_column(String(100))
    member_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The whole envelope as JSON (EventEnvelope.to_json()).
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class ConsumedEvent(Base):
    """Which event ids a consumer has already handled: redelivery after a crash changes nothing."""

    __tablename__ = "consumed_events"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    consumed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ScheduledRun(Base):
    """When a scheduled job (e.g. the segments' refresh for conditions that change with time
    alone) last started: the claim that lets one process, and only one, run each round."""

    __tablename__ = "scheduled_runs"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The last round's failure (None when it succeeded).
    error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
