"""The points ledger.

* one ``Account`` per member and currency, and one emission account per legal entity and
  currency that funds what the entity issues;
* every accrual makes a ``Lot`` (amount, remaining, activates_at, expires_at, source);
* every movement is a ``LedgerEntry`` with ``Posting`` rows that sum to zero (double entry):
  accrual = emission -x, member +x; write-off and expiry the other way, one posting per lot
  consumed, so history can say which lot paid for what;
* a member account's balance is the sum of its lots' ``remaining``, which always equals the
  sum of its postings;
* ``Reservation`` holds points for an unconfirmed purchase (two-phase processing).

Amounts are stored with 4 places (``POINTS_SCALE``) so a currency may keep up to 4; each
currency's own ``precision`` is enforced by the service.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from omniloyal.db.base import Base
from omniloyal.db.types import Amount, BigId, Json, UTCDateTime
from omniloyal.kernel.clock import utcnow

# Places stored for every points amount: the most a currency's precision may ask for.
POINTS_SCALE = 4

ACCOUNT_KINDS = ("member", "emission")
ENTRY_KINDS = ("accrual", "write_off", "expiry", "activation", "refund", "reversal")


class Currency(Base):
    __tablename__ = "currencies"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # Places kept after rounding (0 = whole points).
    precision: Mapped[int] = mapped_column(Integer, default=2)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("member_id", "currency"),
        UniqueConstraint("legal_entity_id", "currency"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True)
    legal_entity_id: Mapped[int | None] = mapped_column(ForeignKey("legal_entities.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LedgerEntry(Base):
    """One movement of points, explained: what, why, from where, by whom."""

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_entries_member", "member_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True)
    currency: Mapped[str] = mapped_column(ForeignKey("currencies.code"))
    # Magnitude moved to (+) or from (-) the member account.
    amount: Mapped[Decimal] = mapped_column(Amount(POINTS_SCALE))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # "manual", "purchase", "refund", "offer", "expiry_job", "import"...
    source: Mapped[str] = mapped_column(String(50))
    source_ref: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    legal_entity_id: Mapped[int | None] = mapped_column(ForeignKey("legal_entities.id"), nullable=True)
    actor: Mapped[str | None] = mapped_column(String(200), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Lot(Base):
    __tablename__ = "lots"
    __table_args__ = (
        Index("ix_lots_account_open", "account_id", "expires_at"),
        Index("ix_lots_expires", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[Decimal] = mapped_column(Amount(POINTS_SCALE))
    remaining: Mapped[Decimal] = mapped_column(Amount(POINTS_SCALE))
    accrued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    activates_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"))
    legal_entity_id: Mapped[int] = mapped_column(ForeignKey("legal_entities.id"))
    source: Mapped[str] = mapped_column(String(50))
    # Set when remaining reaches zero (spent or burnt), so open-lot scans stay small.
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    activation_recorded: Mapped[bool] = mapped_column(default=False)


class Posting(Base):
    __tablename__ = "postings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    lot_id: Mapped[int | None] = mapped_column(ForeignKey("lots.id"), nullable=True, index=True)
    amount: Mapped[Decimal] = mapped_column(Amount(POINTS_SCALE))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Reservation(Base):
    """Points held for an unconfirmed operation; released on cancel, spent on confirm."""

    __tablename__ = "reservations"
    __table_args__ = (Index("ix_reservations_account_state", "account_id", "state"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[Decimal] = mapped_column(Amount(POINTS_SCALE))
    operation_id: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[str] = mapped_column(String(12), default="held")  # held | confirmed | released
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The write-off made on confirm, so a repeated confirm returns it instead of spending twice.
    entry_id: Mapped[int | None] = mapped_column(ForeignKey("ledger_entries.id"), nullable=True)
