"""The unified customer profile: the loyalty side's member, balances and cards, with the
warehouse's features and a timeline of everything the member did, across channels."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from omniloyal.analytics import features as features_module
from omniloyal.analytics.features import VISIT_TYPES
from omniloyal.analytics.schema import UTM_COLUMNS
from omniloyal.analytics.schemas import (
    FeaturesOut,
    IdentifiersOut,
    ProfileOut,
    TimelineItem,
    TimelineKind,
    TimelinePage,
)
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.kernel.pagination import check_limit
from omniloyal.ledger import service as ledger
from omniloyal.members import service as members

PROFILE_TIMELINE_LIMIT = 20
_IDENTIFIER_FIELDS = ("phone", "email", "external_id")


def member_features(wh: Warehouse, member_id: int) -> FeaturesOut | None:
    row = features_module.member_features(wh, member_id)
    return FeaturesOut.model_validate(row) if row is not None else None


def timeline_kind(event_type: str, source: str | None) -> TimelineKind:
    if event_type.startswith("purchase.") or event_type.startswith("order_"):
        return "purchase"
    if event_type.startswith("message."):
        return "message"
    if event_type == "contact_center_call" or source == "contact_center":
        return "contact_center"
    if source == "mobile_app" or event_type in ("app_installed", "mobile_app_installed"):
        return "app"
    if source in ("web", "online_store") or event_type in VISIT_TYPES:
        return "web"
    return "loyalty"


def _encode_cursor(occurred_at: datetime, event_id: str) -> str:
    raw = json.dumps([occurred_at.isoformat(), event_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode((cursor + "=" * (-len(cursor) % 4)).encode()).decode()
        at, event_id = json.loads(raw)
        moment = datetime.fromisoformat(at)
        if moment.tzinfo is None or not isinstance(event_id, str):
            raise ValueError(raw)
        return moment, event_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise AppError(
            "invalid_cursor", f"Cursor {cursor!r} is not one this API returned", field="cursor"
        ) from exc


def member_timeline(
    wh: Warehouse, member_id: int, limit: int = 50, cursor: str | None = None
) -> TimelinePage:
    """Everything the member did, newest first: purchases, web and app, messages, contact
    centre, loyalty events, and the anonymous history linked to them. Keyset pagination on
    (time, id), so new events arriving meanwhile never shift a page."""
    limit = check_limit(limit)
    params: dict[str, Any] = {"member": member_id, "n": limit + 1}
    after = ""
    if cursor:
        params["at"], params["id"] = _decode_cursor(cursor)
        after = " AND (occurred_at < $at OR (occurred_at = $at AND id < $id))"
    utm = ", ".join(UTM_COLUMNS)
    rows = wh.query(
        f"SELECT id, type, occurred_at, source, store, anonymous_id, properties, {utm} "
        f"FROM {{events}} WHERE member_id = $member{after} "
        "ORDER BY occurred_at DESC, id DESC LIMIT $n",
        params,
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1]["occurred_at"], rows[-1]["id"])
    items = [
        TimelineItem(
            id=r["id"],
            type=r["type"],
            kind=timeline_kind(r["type"], r["source"]),
            occurred_at=r["occurred_at"],
            source=r["source"],
            store=r["store"],
            anonymous_id=r["anonymous_id"],
            properties=json.loads(r["properties"] or "{}"),
            utm={k: r[k] for k in UTM_COLUMNS if r[k]},
        )
        for r in rows
    ]
    return TimelinePage(items=items, next_cursor=next_cursor)


def _anonymous_ids(wh: Warehouse, member_id: int) -> list[str]:
    rows = wh.query(
        "SELECT anonymous_id FROM {identity_links} WHERE member_id = $member ORDER BY anonymous_id",
        {"member": member_id},
    )
    return [r["anonymous_id"] for r in rows]


# Data-quality fields of the member record (members.quality keeps them on the member).
_QUALITY_FIELDS = frozenset(
    {
        "phone_status",
        "phone_type",
        "phone_operator",
        "email_status",
        "email_provider",
        "address_status",
        "city_normalized",
        "region",
    }
)


def _is_quality(name: str) -> bool:
    return name in _QUALITY_FIELDS or "quality" in name or name == "flags" or name.endswith("_flags")


def member_profile(
    db: Database,
    wh: Warehouse,
    member_id: int,
    limit: int = PROFILE_TIMELINE_LIMIT,
    cursor: str | None = None,
) -> ProfileOut:
    """``unknown_member`` (404) when the loyalty side has no such member."""
    member = members.get_member(db, member_id)
    balances = ledger.member_balance(db, member_id).balances
    record = member.model_dump(mode="json")
    for name in ("id", "cards", "consents"):
        record.pop(name, None)
    data_quality: dict[str, Any] = {}
    for name in [n for n in record if _is_quality(n)]:
        value = record.pop(name)
        if name == "data_quality" and isinstance(value, dict):
            data_quality.update(value)
        else:
            data_quality[name] = value
    questionnaire = {k: v for k, v in record.items() if k not in _IDENTIFIER_FIELDS}
    return ProfileOut(
        member_id=member.id,
        questionnaire=questionnaire,
        identifiers=IdentifiersOut(
            member_id=member.id,
            external_id=member.external_id,
            phone=member.phone,
            email=member.email,
            cards=[c.number for c in member.cards],
            anonymous_ids=_anonymous_ids(wh, member_id),
        ),
        cards=member.cards,
        balances=balances,
        consents=member.consents,
        data_quality=data_quality,
        features=member_features(wh, member_id),
        timeline=member_timeline(wh, member_id, limit, cursor),
    )


def timeline_of_member(
    db: Database, wh: Warehouse, member_id: int, limit: int, cursor: str | None
) -> TimelinePage:
    """The timeline API: ``unknown_member`` (404) for a member the loyalty side does not know."""
    members.get_member(db, member_id)
    return member_timeline(wh, member_id, limit, cursor)
