"""Admin API of the unified customer profile: ``/api/v1/admin/members/{id}/profile`` and
``/timeline``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from omniloyal.analytics import service
from omniloyal.analytics.schemas import ProfileOut, TimelinePage
from omniloyal.analytics.warehouse import Warehouse, get_warehouse
from omniloyal.auth.deps import get_db, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/api/v1/admin/members", tags=["profiles"])

_READERS = ("operator", "analyst", "marketer")


def get_wh(request: Request) -> Warehouse:
    """The app's warehouse: ``app.state.warehouse`` if set, else the one of its settings."""
    warehouse: Warehouse | None = getattr(request.app.state, "warehouse", None)
    return warehouse or get_warehouse(request.app.state.settings)


@router.get("/{member_id}/profile", response_model=ProfileOut)
def member_profile(
    member_id: int,
    limit: int = Query(service.PROFILE_TIMELINE_LIMIT, description="Timeline items on the first page"),
    cursor: str | None = Query(None, description="Timeline page: next_cursor of the previous answer"),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> ProfileOut:
    """Questionnaire, identifiers, cards, balances, consents, data-quality flags, features and
    the first page of the timeline."""
    return service.member_profile(db, wh, member_id, limit, cursor)


@router.get("/{member_id}/timeline", response_model=TimelinePage)
def member_timeline(
    member_id: int,
    limit: int = Query(DEFAULT_LIMIT),
    cursor: str | None = Query(None),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> TimelinePage:
    """Everything the member did across channels, newest first."""
    return service.timeline_of_member(db, wh, member_id, limit, cursor)
