"""Offers, their status history and usage counters; target audiences (member lists offers filter on)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from omniloyal.db.base import Base
from omniloyal.db.types import Amount, BigId, Json, UTCDateTime
from omniloyal.kernel.clock import utcnow

OFFER_STATUSES = ("draft", "active", "paused", "finished", "archived")


class Offer(Base):
    __tablename__ = "offers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(300))
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="draft", index=True)
    # The period is wall-clock time of the store where the purchase happens (naive on purpose).
    starts_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    ends_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    summable: Mapped[bool] = mapped_column(Boolean, default=False)
    # [{"event": ..., "filters": [{"type": ..., ...}], "actions": [{"type": ..., ...}]}]
    chains: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    max_uses_per_member: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_points: Mapped[Decimal | None] = mapped_column(Amount(2), nullable=True)
    budget_money: Mapped[Decimal | None] = mapped_column(Amount(2), nullable=True)
    spent_points: Mapped[Decimal] = mapped_column(Amount(2), default=Decimal(0))
    spent_money: Mapped[Decimal] = mapped_column(Amount(2), default=Decimal(0))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class OfferStatusChange(Base):
    __tablename__ = "offer_status_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    offer_id: Mapped[int] = mapped_column(ForeignKey("offers.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(20), nullable=True)
    to_status: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))


class OfferUse(Base):
    """How many times an offer applied to a member (for "times per member" limits)."""

    __tablename__ = "offer_uses"

    offer_id: Mapped[int] = mapped_column(ForeignKey("offers.id", ondelete="CASCADE"), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)


class TargetAudience(Base):
    __tablename__ = "target_audiences"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(300))
    # "api" (lists managed by hand or by integrations) or "segment" (filled from a segment)
    source: Mapped[str] = mapped_column(String(20), default="api")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class TargetAudienceMember(Base):
    __tablename__ = "target_audience_members"
    __table_args__ = (Index("ix_target_audience_members_member", "member_id"),)

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("target_audiences.id", ondelete="CASCADE"), primary_key=True
    )
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
