"""Ingest API models: what a site, an app, the contact centre or an integration sends.

Per-type rules for ``properties`` (required fields, decimals, quantities) live in
``events.tracking``; this module has the shapes only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omniloyal.kernel.money import DecimalStr


class MemberRefIn(BaseModel):
    """Who the event is about: one identifier is enough (``id`` > ``card`` > ``external_id`` >
    ``phone`` > ``email`` when several are given to a web event)."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = None
    card: str | None = Field(default=None, max_length=64)
    phone: str | None = Field(default=None, max_length=40)
    email: str | None = Field(default=None, max_length=254)
    external_id: str | None = Field(default=None, max_length=100)


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The sender's id: sending it again is harmless (answered "duplicate").
    id: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=100)
    occurred_at: datetime
    member: MemberRefIn | None = None
    # The visitor before login: the tracker's first-party cookie, an app's install id.
    anonymous_id: str | None = Field(default=None, min_length=1, max_length=200)
    store: str | None = Field(default=None, max_length=64)
    # Channel: web, mobile_app, online_store, contact_center, pos, offline, dwh... (lower-case token)
    source: str | None = Field(default=None, max_length=50)
    url: str | None = Field(default=None, max_length=4000)
    referrer: str | None = Field(default=None, max_length=4000)
    # utm_source, utm_medium, utm_campaign, utm_content, utm_term (the "utm_" prefix may be left out);
    # taken from ``url`` when not given.
    utm: dict[str, str] | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class EventResult(BaseModel):
    index: int
    id: str | None = None
    status: Literal["accepted", "duplicate", "rejected"]
    accrued: dict[str, DecimalStr] = Field(default_factory=dict)
    offers: list[int] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    # An accepted event kept with a reservation, e.g. "unknown_member": kept as anonymous.
    warning: str | None = None


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[EventResult]


# The request body, for the OpenAPI page (the endpoint reads the body itself so a site's
# tracker can send it as text/plain with navigator.sendBeacon).
INGEST_BODY_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "array", "items": {"$ref": "#/components/schemas/EventIn"}, "maxItems": 1000},
        {
            "type": "object",
            "properties": {
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/EventIn"}},
                "key": {
                    "type": "string",
                    "description": "The API key, for senders that cannot set a header (sendBeacon)",
                },
            },
            "required": ["events"],
        },
    ]
}
