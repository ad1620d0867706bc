"""The one event schema every fact travels in: loyalty changes, web and app events, DWH imports.

An envelope is what the outbox stores, the bus carries and every consumer (warehouse sink,
features, triggers) receives. Consumers are idempotent on ``id``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

UTM_FIELDS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")


class EventEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Globally unique: the sender's id for ingested events, "<type>:<entity ref>" for loyalty changes.
    id: str = Field(min_length=1, max_length=200)
    # Dotted lower-case names: "purchase.confirmed", "member.registered", "page_view", ...
    type: str = Field(min_length=1, max_length=100)
    occurred_at: datetime
    received_at: datetime
    member_id: int | None = None
    anonymous_id: str | None = None
    # Where the fact came from: "pos", "online_store", "mobile_app", "web", "contact_center",
    # "dwh", "loyalty" (changes made by the platform itself), "admin".
    source: str = "loyalty"
    store: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    utm: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
