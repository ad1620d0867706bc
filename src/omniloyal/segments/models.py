"""Segments in the operational store: definitions, their dependency graph, freshness, count
history, and the RFM runs. Memberships themselves live in the warehouse (``segments.tables``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from omniloyal.db.base import Base
from omniloyal.db.types import BigId, Json, UTCDateTime
from omniloyal.kernel.clock import utcnow

SEGMENT_KINDS = ("dynamic", "static")
SEGMENT_STATUSES = ("active", "archived")


class Segment(Base):
    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    # dynamic: kept fresh from events and periodic refreshes; static: changes only when rebuilt.
    kind: Mapped[str] = mapped_column(String(10), default="dynamic")
    status: Mapped[str] = mapped_column(String(10), default="active", index=True)
    # The condition tree (docs/segments.md).
    conditions: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    # A target audience kept equal to the segment's membership (or null).
    audience: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Bumped on every change of the definition.
    version: Mapped[int] = mapped_column(Integer, default=1)
    member_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Last full build; last time brought up to date (full build or events); how long the build took.
    materialised_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    build_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Why the last refresh failed (cleared by the next success): staleness is never silent.
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class SegmentReference(Base):
    """``segment_id`` uses ``uses_id`` ("member of segment"): the dependency graph (no cycles)."""

    __tablename__ = "segment_references"
    __table_args__ = (Index("ix_segment_references_uses", "uses_id"),)

    segment_id: Mapped[int] = mapped_column(ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)
    uses_id: Mapped[int] = mapped_column(ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)


class SegmentCount(Base):
    """The history of a segment's size: one row per full build or refresh from events."""

    __tablename__ = "segment_counts"
    __table_args__ = (Index("ix_segment_counts_segment", "segment_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    segment_id: Mapped[int] = mapped_column(ForeignKey("segments.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    member_count: Mapped[int] = mapped_column(BigInteger)
    entered: Mapped[int] = mapped_column(BigInteger, default=0)
    left: Mapped[int] = mapped_column(BigInteger, default=0)
    # materialise | events
    cause: Mapped[str] = mapped_column(String(20))
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)


class RfmRun(Base):
    """One RFM recompute: the period, the quintile boundaries used, how many members scored."""

    __tablename__ = "rfm_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    computed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    period_days: Mapped[int] = mapped_column(Integer)
    members: Mapped[int] = mapped_column(BigInteger, default=0)
    # {"r": [b1, b2, b3, b4], "f": [...], "m": ["...", ...]}: upper bounds of quintiles 1..4.
    boundaries: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    group_changes: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
