"""Members and cards.

Every identifier is unique across members: card number (cards table), phone, e-mail and
external id (unique columns here). Balances belong to the member, not to a card, so a card
replacement moves nothing: the member's accounts simply stay with the member.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import Boolean, Date, ForeignKey, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from omniloyal.db.base import Base
from omniloyal.db.types import BigId, Json, UTCDateTime
from omniloyal.kernel.clock import utcnow

GENDERS = ("male", "female")
CARD_KINDS = ("physical", "virtual")
CARD_STATES = ("prepared", "issued", "activated", "replaced")
BLOCK_REASONS = ("lost", "damaged", "other")
CONSENT_CHANNELS = ("email", "sms", "viber", "push")
ATTRIBUTE_TYPES = ("string", "integer", "decimal", "boolean", "date", "datetime", "enum")


class Member(Base):
    __tablename__ = "members"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(100), unique=True, nullable=True)
    # "active", or "merged" (with merged_into_id) once merged into another member.
    status: Mapped[str] = mapped_column(String(20), default="active")
    first_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    last_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    middle_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    gender: Mapped[str | None] = mapped_column(String(10), nullable=True)
    birth_date: Mapped[date | None] = mapped_column(Date, nullable=True)
    phone: Mapped[str | None] = mapped_column(String(20), unique=True, nullable=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True, nullable=True)
    address: Mapped[str | None] = mapped_column(Text, nullable=True)
    city: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # IANA zone for member-local time (birthdays, quiet hours); from city/phone when known.
    timezone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # [{"name": ..., "birth_date": "YYYY-MM-DD", "gender": ...}]
    children: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    # ["cat", "dog"]
    pets: Mapped[list[str]] = mapped_column(Json, default=list)
    # category paths the member said they like
    preferred_categories: Mapped[list[str]] = mapped_column(Json, default=list)
    # values of the custom attributes, validated against AttributeDefinition
    attributes: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    # ---- identity merge (members.merge): a merged duplicate keeps its row and points here.
    merged_into_id: Mapped[int | None] = mapped_column(
        ForeignKey("members.id"), nullable=True, index=True, default=None
    )
    merged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, default=None)

    # ---- data quality (members.quality.refresh); NULL until the member has been checked.
    # "valid" | "invalid" | "missing"
    phone_status: Mapped[str | None] = mapped_column(String(10), nullable=True, default=None)
    # "mobile", "fixed_line", "fixed_line_or_mobile", "voip", "toll_free", ...
    phone_type: Mapped[str | None] = mapped_column(String(30), nullable=True, default=None)
    # The operator the number range was allocated to (not the operator after porting).
    phone_operator: Mapped[str | None] = mapped_column(String(100), nullable=True, default=None)
    # "valid" | "invalid" | "missing"
    email_status: Mapped[str | None] = mapped_column(String(10), nullable=True, default=None)
    # "Gmail", "Yandex", "Mail.ru", ...; NULL for a company's own domain
    email_provider: Mapped[str | None] = mapped_column(String(50), nullable=True, default=None)
    # "valid" (city found in the gazetteer) | "unrecognised" | "invalid" | "missing"
    address_status: Mapped[str | None] = mapped_column(String(12), nullable=True, default=None)
    # The city and region as the gazetteer spells them ("Санкт-Петербург", "Ленинградская область"...)
    city_normalized: Mapped[str | None] = mapped_column(String(200), nullable=True, default=None)
    region: Mapped[str | None] = mapped_column(String(200), nullable=True, default=None)
    # Details: issues found, suggestions ("gmial.com" -> "gmail.com"), time zones considered.
    quality: Mapped[dict[str, Any]] = mapped_column(Json, default=dict, server_default=text("'{}'"))
    quality_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, default=None)


class MemberContactKey(Base):
    """Canonical contacts of a member (phone in E.164, e-mail with provider aliases folded), from
    the contact columns and from questionnaire attributes; two members sharing a key are
    probably one person (``GET /api/v1/admin/members/duplicates``). Kept by ``quality.refresh``."""

    __tablename__ = "member_contact_keys"
    __table_args__ = (Index("ix_member_contact_keys_member", "member_id"),)

    kind: Mapped[str] = mapped_column(String(10), primary_key=True)  # "phone" | "email"
    value: Mapped[str] = mapped_column(String(254), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"), primary_key=True)


class AnonymousLink(Base):
    """A web/app visitor id attached to a member (login, registration, identify, a click from a
    message): its history up to 60 days back belongs to the member (``identity.linked``)."""

    __tablename__ = "anonymous_links"
    __table_args__ = (Index("ix_anonymous_links_member", "member_id"),)

    anonymous_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    linked_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The ingested event that made the link.
    event_id: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Card(Base):
    __tablename__ = "cards"
    __table_args__ = (
        # At most one activated card of each kind per member, enforced by the store itself.
        Index(
            "uq_cards_member_kind_activated",
            "member_id",
            "kind",
            unique=True,
            sqlite_where=text("state = 'activated'"),
            postgresql_where=text("state = 'activated'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    number: Mapped[str] = mapped_column(String(64), unique=True)
    # Cards printed in advance wait in stores without a member.
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(10))
    state: Mapped[str] = mapped_column(String(12), default="prepared")
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    block_reason: Mapped[str | None] = mapped_column(String(20), nullable=True)
    block_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    blocked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    replaced_by_id: Mapped[int | None] = mapped_column(ForeignKey("cards.id"), nullable=True)
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class MemberConsent(Base):
    """Current consent of a member for a channel, with when and where it was given or withdrawn."""

    __tablename__ = "member_consents"

    member_id: Mapped[int] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(20), primary_key=True)
    granted: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    source: Mapped[str] = mapped_column(String(100))


class AttributeDefinition(Base):
    """A custom member attribute: its type and validation."""

    __tablename__ = "attribute_definitions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(20))
    required: Mapped[bool] = mapped_column(Boolean, default=False)
    # enum: allowed values; string: max_length, pattern; integer/decimal: min, max
    choices: Mapped[list[str] | None] = mapped_column(Json, nullable=True)
    constraints: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
