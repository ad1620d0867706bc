"""API models for keys and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# tracker: the write-only key a website's JS tracker carries in public; it can send web events only.
Role = Literal["admin", "marketer", "operator", "analyst", "pos", "client", "tracker"]
ROLES: tuple[str, ...] = ("admin", "marketer", "operator", "analyst", "pos", "client", "tracker")


class Principal(BaseModel):
    """Who is calling: the key's role and its scope (a till's store, a member's own id)."""

    model_config = ConfigDict(frozen=True)

    key_id: int | None
    name: str
    role: Role
    store_id: int | None = None
    member_id: int | None = None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    name: str = Field(default="", max_length=200)
    store: str | None = Field(default=None, description="Store code; required for role pos")
    member_id: int | None = Field(default=None, description="Required for role client")


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str
    role: Role
    store: str | None
    member_id: int | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The secret; shown once, stored only as a hash")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
