"""Ingest API models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omniloyal.kernel.money import DecimalStr


class MemberRefIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int | None = None
    card: str | None = None
    phone: str | None = None
    email: str | None = None
    external_id: str | None = None


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=100)
    occurred_at: datetime
    member: MemberRefIn | None = None
    store: str | None = None
    source: str | None = Field(default=None, max_length=50)
    properties: dict[str, Any] = Field(default_factory=dict)


class EventResult(BaseModel):
    index: int
    id: str | None = None
    status: Literal["accepted", "duplicate", "rejected"]
    accrued: dict[str, DecimalStr] = Field(default_factory=dict)
    offers: list[int] = Field(default_factory=list)
    error: dict[str, Any] | None = None


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[EventResult]
