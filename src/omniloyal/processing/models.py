"""Purchase operations as the till sees them, and the confirmed lines history reads.

An ``Operation`` is keyed by the till's ``operation_id`` within its store: a repeated request
finds it and returns the stored answer, changing nothing.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from omniloyal.db.base import Base
from omniloyal.db.types import Amount, BigId, Json, UTCDateTime
from omniloyal.kernel.clock import utcnow

OPERATION_KINDS = ("purchase", "refund", "offline")
OPERATION_STATES = ("calculated", "confirmed", "cancelled")


class Operation(Base):
    __tablename__ = "operations"
    __table_args__ = (
        UniqueConstraint("store_id", "operation_id"),
        Index("ix_operations_member", "member_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    operation_id: Mapped[str] = mapped_column(String(200))
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id"))
    kind: Mapped[str] = mapped_column(String(10))
    state: Mapped[str] = mapped_column(String(12), default="calculated")
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True)
    card_id: Mapped[int | None] = mapped_column(ForeignKey("cards.id"), nullable=True)
    purchase_id: Mapped[int | None] = mapped_column(ForeignKey("operations.id"), nullable=True, index=True)
    cheque_number: Mapped[str | None] = mapped_column(String(100), nullable=True)
    cheque_at: Mapped[datetime] = mapped_column(UTCDateTime())
    amount: Mapped[Decimal] = mapped_column(Amount(2))
    discount: Mapped[Decimal] = mapped_column(Amount(2), default=Decimal(0))
    # {"bonus": "12.00"}: points planned to be written off / accrued
    write_off: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    accrual: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    # The engine's plan (accrual lots with their lifetimes, applied offers) and the first answer.
    plan: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    response: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    payments: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class PurchaseLine(Base):
    __tablename__ = "purchase_lines"
    __table_args__ = (UniqueConstraint("operation_id", "line"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    operation_id: Mapped[int] = mapped_column(ForeignKey("operations.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)
    sku: Mapped[str] = mapped_column(String(100), index=True)
    price: Mapped[Decimal] = mapped_column(Amount(2))
    quantity: Mapped[Decimal] = mapped_column(Amount(3))
    amount: Mapped[Decimal] = mapped_column(Amount(2))
    discount: Mapped[Decimal] = mapped_column(Amount(2), default=Decimal(0))
    write_off: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    bonus: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    refunded_quantity: Mapped[Decimal] = mapped_column(Amount(3), default=Decimal(0))
    offers: Mapped[list[int]] = mapped_column(Json, default=list)
