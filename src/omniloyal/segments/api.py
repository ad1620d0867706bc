"""Admin API of segments, RFM and customer reports.

``/api/v1/admin/segments`` (definitions, live counts, samples, builds, memberships, exports),
``/api/v1/admin/rfm`` (recompute, groups and matrices, a member's scores) and
``/api/v1/admin/reports/...`` (customer base, revenue, channels), every report filterable by
``segment_id``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse

from omniloyal.analytics.api import get_wh
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.auth.deps import get_db, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.clock import ensure_utc
from omniloyal.kernel.pagination import DEFAULT_LIMIT, Page
from omniloyal.segments import reports, rfm, service
from omniloyal.segments.schemas import (
    AudienceExportIn,
    AudienceExportOut,
    BaseReport,
    BuildOut,
    ChangeRow,
    ChannelReport,
    ConditionsIn,
    CountOut,
    CountPoint,
    Interval,
    MemberPage,
    RevenueReport,
    RfmMemberOut,
    RfmOverview,
    RfmRunIn,
    RfmRunOut,
    SampleOut,
    SegmentIn,
    SegmentOut,
    SegmentStatus,
    SegmentUpdate,
)

router = APIRouter(prefix="/api/v1/admin", tags=["segments"])

_WRITERS = ("marketer",)
_READERS = ("marketer", "analyst")
SEGMENTS = "/segments"


def _utc(value: datetime | None, field: str) -> datetime | None:
    return ensure_utc(value, field=field) if value is not None else None


# ---------------------------------------------------------------- definitions


@router.post(SEGMENTS, response_model=SegmentOut, status_code=201)
def create_segment(
    body: SegmentIn, db: Database = Depends(get_db), actor: Principal = Depends(require(*_WRITERS))
) -> SegmentOut:
    """A segment from a condition tree; a bad node is refused (422) with its path in ``field``,
    e.g. ``conditions.all[2].any[0].value``."""
    return service.create_segment(db, body, actor)


@router.get(SEGMENTS, response_model=Page[SegmentOut])
def list_segments(
    limit: int = Query(DEFAULT_LIMIT),
    cursor: str | None = Query(None),
    status: SegmentStatus | None = Query(None),
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*_READERS)),
) -> Page[SegmentOut]:
    items, next_cursor = service.list_segments(db, limit, cursor, status)
    return Page[SegmentOut](items=items, next_cursor=next_cursor)


@router.post(f"{SEGMENTS}/count", response_model=CountOut)
def count_definition(
    body: ConditionsIn,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> CountOut:
    """Live count of an unsaved definition (validated like a saved one)."""
    return service.count_definition(db, wh, body.conditions)


@router.post(f"{SEGMENTS}/refresh", response_model=list[BuildOut])
def refresh_all(
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_WRITERS)),
) -> list[BuildOut]:
    """Rebuilds every active dynamic segment (what the periodic job does)."""
    return service.refresh_all(db, wh)


@router.get(f"{SEGMENTS}/{{segment_id}}", response_model=SegmentOut)
def get_segment(
    segment_id: int, db: Database = Depends(get_db), _: Principal = Depends(require(*_READERS))
) -> SegmentOut:
    return service.get_segment(db, segment_id)


@router.patch(f"{SEGMENTS}/{{segment_id}}", response_model=SegmentOut)
def update_segment(
    segment_id: int,
    body: SegmentUpdate,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    actor: Principal = Depends(require(*_WRITERS)),
) -> SegmentOut:
    """Changes fields; new conditions are validated (cycles through other segments refused). A
    built dynamic segment whose conditions change is rebuilt at once."""
    return service.update_segment(db, segment_id, body, actor, wh)


@router.delete(f"{SEGMENTS}/{{segment_id}}", status_code=204)
def delete_segment(
    segment_id: int,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    actor: Principal = Depends(require(*_WRITERS)),
) -> Response:
    """Refused (409 ``segment_in_use``) while another segment refers to it."""
    service.delete_segment(db, wh, segment_id, actor)
    return Response(status_code=204)


# ---------------------------------------------------------------- use


@router.get(f"{SEGMENTS}/{{segment_id}}/count", response_model=CountOut)
def count_segment(
    segment_id: int,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> CountOut:
    """How many members the segment has right now (evaluated on the warehouse)."""
    return service.count_segment(db, wh, segment_id)


@router.get(f"{SEGMENTS}/{{segment_id}}/sample", response_model=SampleOut)
def sample(
    segment_id: int,
    limit: int = Query(20),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> SampleOut:
    return service.sample(db, wh, segment_id, limit)


@router.post(f"{SEGMENTS}/{{segment_id}}/materialise", response_model=BuildOut)
def materialise(
    segment_id: int,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_WRITERS)),
) -> BuildOut:
    """Rebuilds the membership snapshot; entries and exits are recorded and (after the first
    build) emitted as ``segment.entered`` / ``segment.left``."""
    return service.materialise(db, wh, segment_id)


@router.get(f"{SEGMENTS}/{{segment_id}}/members", response_model=MemberPage)
def members(
    segment_id: int,
    limit: int = Query(DEFAULT_LIMIT),
    cursor: str | None = Query(None),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> MemberPage:
    """The materialised members, by id."""
    return service.members_page(db, wh, segment_id, limit, cursor)


@router.get(f"{SEGMENTS}/{{segment_id}}/changes", response_model=list[ChangeRow])
def changes(
    segment_id: int,
    limit: int = Query(100),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> list[ChangeRow]:
    """Latest entries and exits, newest first."""
    return service.changes(db, wh, segment_id, limit)


@router.get(f"{SEGMENTS}/{{segment_id}}/history", response_model=list[CountPoint])
def history(
    segment_id: int,
    limit: int = Query(100),
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*_READERS)),
) -> list[CountPoint]:
    """The segment's size at every build and refresh, newest first."""
    return service.count_history(db, segment_id, limit)


@router.get(f"{SEGMENTS}/{{segment_id}}/export.csv")
def export_csv(
    segment_id: int,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> StreamingResponse:
    chunks = service.export_csv(db, wh, segment_id)
    first = next(chunks)  # evaluates the segment now: errors become proper responses

    def body() -> Any:
        yield first
        yield from chunks

    return StreamingResponse(
        body(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="segment-{segment_id}.csv"'},
    )


@router.post(f"{SEGMENTS}/{{segment_id}}/export/audience", response_model=AudienceExportOut)
def export_audience(
    segment_id: int,
    body: AudienceExportIn,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    actor: Principal = Depends(require(*_WRITERS)),
) -> AudienceExportOut:
    """The segment's current members into a target audience (add, remove, or replace); offers
    filtering on that audience apply to them at once."""
    return service.export_to_audience(db, wh, segment_id, body, actor)


# ---------------------------------------------------------------- RFM


@router.post("/rfm/recompute", response_model=RfmRunOut)
def rfm_recompute(
    body: RfmRunIn | None = None,
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_WRITERS)),
) -> RfmRunOut:
    """Scores every member with purchases in the period (default 365 days)."""
    return rfm.recompute(db, wh, period_days=(body or RfmRunIn()).period_days)


@router.get("/rfm", response_model=RfmOverview)
def rfm_overview(
    segment_id: int | None = Query(None),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> RfmOverview:
    """Named groups with counts and revenue; RF, RM and FM 5x5 matrices with boundaries."""
    return rfm.overview(db, wh, segment_id)


@router.get("/rfm/members/{member_id}", response_model=RfmMemberOut)
def rfm_member(
    member_id: int, wh: Warehouse = Depends(get_wh), _: Principal = Depends(require(*_READERS))
) -> RfmMemberOut:
    return rfm.member_scores(wh, member_id)


# ---------------------------------------------------------------- reports


@router.get("/reports/customer-base", response_model=BaseReport)
def customer_base(
    interval: Interval = Query("month"),
    since: datetime | None = Query(None),
    until: datetime | None = Query(None),
    segment_id: int | None = Query(None),
    lost_after_days: int = Query(reports.DEFAULT_LOST_AFTER_DAYS, ge=1, le=3650),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> BaseReport:
    return reports.customer_base(
        db,
        wh,
        interval=interval,
        since=_utc(since, "since"),
        until=_utc(until, "until"),
        segment_id=segment_id,
        lost_after_days=lost_after_days,
    )


@router.get("/reports/revenue", response_model=RevenueReport)
def revenue(
    interval: Interval = Query("month"),
    since: datetime | None = Query(None),
    until: datetime | None = Query(None),
    segment_id: int | None = Query(None),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> RevenueReport:
    return reports.revenue(
        db,
        wh,
        interval=interval,
        since=_utc(since, "since"),
        until=_utc(until, "until"),
        segment_id=segment_id,
    )


@router.get("/reports/channels", response_model=ChannelReport)
def channels(
    since: datetime | None = Query(None),
    until: datetime | None = Query(None),
    segment_id: int | None = Query(None),
    db: Database = Depends(get_db),
    wh: Warehouse = Depends(get_wh),
    _: Principal = Depends(require(*_READERS)),
) -> ChannelReport:
    return reports.channels(
        db, wh, since=_utc(since, "since"), until=_utc(until, "until"), segment_id=segment_id
    )
