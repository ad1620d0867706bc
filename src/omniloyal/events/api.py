"""``POST /api/v1/events``: batched events from sites, apps, the contact centre and integrations."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends

from omniloyal.auth.deps import get_db, get_settings_dep, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.events import service
from omniloyal.events.schemas import IngestResponse
from omniloyal.settings import Settings

router = APIRouter(prefix="/api/v1", tags=["events"])


@router.post("/events", response_model=IngestResponse)
def ingest(
    body: Any = Body(
        ...,
        description='A list of events (or {"events": [...]}), each {id, type, occurred_at, member: '
        "{card|phone|email|id}, store?, properties}; at most 1,000",
    ),
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    principal: Principal = Depends(require("pos", "operator", "marketer")),
) -> IngestResponse:
    return service.ingest(db, principal, body, settings.default_phone_region, settings.default_timezone)
