"""Profile and timeline API models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from omniloyal.kernel.money import DecimalStr
from omniloyal.ledger.schemas import CurrencyBalance
from omniloyal.members.schemas import CardOut, ConsentsOut

TimelineKind = Literal["purchase", "web", "app", "message", "contact_center", "loyalty"]


class TimelineItem(BaseModel):
    id: str
    type: str
    kind: TimelineKind = Field(description="purchase, web, app, message, contact_center or loyalty")
    occurred_at: datetime
    source: str | None
    store: str | None
    anonymous_id: str | None = Field(description="Set when the event happened before the visitor logged in")
    properties: dict[str, Any]
    utm: dict[str, str]


class TimelinePage(BaseModel):
    items: list[TimelineItem]
    next_cursor: str | None = None


class FeaturesOut(BaseModel):
    purchases_count: int
    purchases_total: DecimalStr
    refunds_total: DecimalStr
    ltv: DecimalStr = Field(description="Purchases total net of refunds")
    avg_cheque: DecimalStr | None
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    favourite_categories: list[str] = Field(description="Top 3 by spend")
    favourite_stores: list[str] = Field(description="Top 3 by spend")
    channels: list[str]
    last_site_visit_at: datetime | None
    last_app_visit_at: datetime | None
    last_message_opened_at: datetime | None
    last_message_clicked_at: datetime | None
    last_activity_at: datetime | None
    updated_at: datetime


class IdentifiersOut(BaseModel):
    member_id: int
    external_id: str | None
    phone: str | None
    email: str | None
    cards: list[str] = Field(description="Numbers of the member's cards")
    anonymous_ids: list[str] = Field(description="Web/app visitor ids linked to the member")


class ProfileOut(BaseModel):
    member_id: int
    questionnaire: dict[str, Any]
    identifiers: IdentifiersOut
    cards: list[CardOut]
    balances: list[CurrencyBalance]
    consents: ConsentsOut
    data_quality: dict[str, Any] = Field(
        description="Flags of invalid or missing contacts, as the member record has them"
    )
    features: FeaturesOut | None = Field(description="Null until the warehouse has seen the member")
    timeline: TimelinePage
