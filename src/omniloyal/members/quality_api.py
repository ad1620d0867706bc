"""Admin endpoints for contact data quality and identity: the data-quality report, probable
duplicate members and merging them.

Include this router **before** ``members.api``'s: ``/members/duplicates`` would otherwise be
read as ``/members/{member_id}``.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from omniloyal.auth.deps import get_db, get_settings_dep, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.kernel.pagination import DEFAULT_LIMIT, check_limit
from omniloyal.members import merge as merging
from omniloyal.members import quality
from omniloyal.members.merge import MergeIn, MergeOut
from omniloyal.members.models import Member
from omniloyal.settings import Settings

router = APIRouter(prefix="/api/v1/admin", tags=["data quality and identity"])


class ChannelCounts(BaseModel):
    valid: int
    invalid: int
    missing: int
    # Addresses only: a city the offline gazetteer does not know (often a small town).
    unrecognised: int | None = None


class DataQualityReport(BaseModel):
    members: int = Field(description="Members not merged away")
    checked: int
    pending: int = Field(description="Never checked or changed since; `python -m omniloyal.members.quality`")
    channels: dict[str, ChannelCounts] = Field(
        description="phone, sms (a valid mobile number), email, address"
    )


class MemberBrief(BaseModel):
    id: int
    first_name: str | None
    last_name: str | None
    phone: str | None
    email: str | None
    registered_at: datetime


class SharedContact(BaseModel):
    kind: str
    value: str


class DuplicatePairOut(BaseModel):
    member_id: int = Field(description="The older member: the one suggested to keep")
    duplicate_id: int
    shared: list[SharedContact]
    members: list[MemberBrief]


class DuplicatePage(BaseModel):
    items: list[DuplicatePairOut]
    next_cursor: str | None = None


def _encode(pair: tuple[int, int]) -> str:
    return base64.urlsafe_b64encode(f"pair:{pair[0]}:{pair[1]}".encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[int, int]:
    try:
        text = base64.urlsafe_b64decode((cursor + "=" * (-len(cursor) % 4)).encode()).decode()
        kind, first, second = text.split(":")
        if kind != "pair":
            raise ValueError(text)
        return int(first), int(second)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise AppError(
            "invalid_cursor", f"Cursor {cursor!r} is not one this API returned", field="cursor"
        ) from exc


@router.get("/data-quality", response_model=DataQualityReport)
def data_quality(
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    _: Principal = Depends(require("operator", "marketer", "analyst")),
) -> DataQualityReport:
    """Valid / invalid / missing contacts per channel. Members changed since their last check are
    checked first (up to 5,000 in the request; a bigger backlog is left to the bulk refresh)."""
    quality.refresh_pending(db, quality.PENDING_LIMIT, settings.default_phone_region)
    with db.reading() as session:
        return DataQualityReport.model_validate(quality.report(session))


@router.get("/members/duplicates", response_model=DuplicatePage)
def duplicates(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    _: Principal = Depends(require("operator", "marketer", "analyst")),
) -> DuplicatePage:
    """Pairs of members sharing a phone or an e-mail once normalised (``Ivan.Petrov@googlemail.com``
    and ``ivanpetrov@gmail.com`` are one mailbox), from the contact fields and from questionnaire
    attributes that hold a phone or an e-mail."""
    limit = check_limit(limit)
    quality.refresh_pending(db, quality.PENDING_LIMIT, settings.default_phone_region)
    with db.reading() as session:
        pairs = quality.duplicate_pairs(session, limit + 1, _decode(cursor) if cursor else None)
        more = len(pairs) > limit
        pairs = pairs[:limit]
        ids = {i for p in pairs for i in (p.member_id, p.duplicate_id)}
        briefs = {
            m.id: MemberBrief.model_validate(m, from_attributes=True)
            for m in session.scalars(select(Member).where(Member.id.in_(ids)))
        }
        items = [
            DuplicatePairOut(
                member_id=p.member_id,
                duplicate_id=p.duplicate_id,
                shared=[SharedContact(kind=k, value=v) for k, v in p.shared],
                members=[briefs[p.member_id], briefs[p.duplicate_id]],
            )
            for p in pairs
        ]
    next_cursor = _encode((pairs[-1].member_id, pairs[-1].duplicate_id)) if more and pairs else None
    return DuplicatePage(items=items, next_cursor=next_cursor)


@router.post("/members/{member_id}/merge", response_model=MergeOut)
def merge_member(
    member_id: int,
    data: MergeIn,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    actor: Principal = Depends(require("operator")),
) -> MergeOut:
    """Merges ``duplicate_id`` into this member: cards, points, history, consents and the
    questionnaire move here; the duplicate answers lookups with this member from now on."""
    return merging.merge(db, member_id, data.duplicate_id, actor, settings.default_phone_region)


@router.post("/data-quality/refresh", response_model=DataQualityReport)
def refresh_quality(
    only_pending: bool = Query(default=True, description="false: check every member again"),
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    _: Principal = Depends(require("operator")),
) -> DataQualityReport:
    """Checks members now (all of them with ``only_pending=false``) and returns the report."""
    quality.refresh_all(db, settings.default_phone_region, only_pending=only_pending)
    with db.reading() as session:
        return DataQualityReport.model_validate(quality.report(session))
