"""Member features kept current by the warehouse sink.

Per member: purchases count and total, average cheque, first and last purchase, refunds and
LTV (total net of refunds), favourite categories (top 3 by spend) and stores (top 3 by spend),
channels used, last site visit, last app visit, last message opened / clicked, last activity.

Incremental: each sink batch refreshes only the members it touched.

* Purchase features of the members whose purchases changed are recomputed from ``purchases``
  and ``purchase_lines`` with one set-based query over those members (so refunds and
  cancellations are exact, and a replay changes nothing).
* Activity features (visits, messages, channels) only grow, so they are merged from the batch:
  ``max(stored, newest in batch)``; a full recompute from ``events`` happens only for members
  whose history was rewritten (an anonymous visitor linked, a duplicate merged in).

Definitions: a purchase counts while it is not cancelled; its total is ``amount - discount``
(what the cheque cost, points included); LTV subtracts refunded money; spend per category or
store is the same net of refunds, ties broken by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from omniloyal.analytics.schema import MEMBER_FEATURES
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.money import ZERO, quantize

# Event types that are a visit of the site or the app ("last site visit").
VISIT_TYPES = frozenset(
    {
        "page_view",
        "section_view",
        "product_view",
        "category_view",
        "search",
        "add_to_cart",
        "remove_from_cart",
        "order_placed",
        "login",
        "registration",
        "app_installed",
    }
)
APP_SOURCE = "mobile_app"
MESSAGE_OPENED = "message.opened"
MESSAGE_CLICKED = "message.clicked"
# Sources that are not a customer's channel (changes made by the platform, staff, imports).
NOT_CHANNELS = frozenset({"loyalty", "admin", "dwh"})
# Channel names as purchases spell them.
CHANNEL_ALIASES = {"pos": "offline"}
TOP = 3

_ACTIVITY_FIELDS = (
    "last_site_visit_at",
    "last_app_visit_at",
    "last_message_opened_at",
    "last_message_clicked_at",
    "last_activity_at",
)


def activity_channel(event_type: str, source: str | None) -> str | None:
    """The customer channel an event shows, if any (purchases count through ``purchases``)."""
    if not source or source in NOT_CHANNELS or event_type.startswith("purchase."):
        return None
    return CHANNEL_ALIASES.get(source, source)


@dataclass
class Activity:
    """What a batch of events says about one member's activity."""

    times: dict[str, datetime] = field(default_factory=dict)
    channels: set[str] = field(default_factory=set)

    def see(self, event_type: str, source: str | None, occurred_at: datetime) -> None:
        names = ["last_activity_at"]
        if event_type in VISIT_TYPES:
            names.append("last_app_visit_at" if source == APP_SOURCE else "last_site_visit_at")
        elif event_type == MESSAGE_OPENED:
            names.append("last_message_opened_at")
        elif event_type == MESSAGE_CLICKED:
            names.append("last_message_clicked_at")
        for name in names:
            current = self.times.get(name)
            if current is None or occurred_at > current:
                self.times[name] = occurred_at
        channel = activity_channel(event_type, source)
        if channel:
            self.channels.add(channel)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


_PURCHASE_SQL = """
WITH p AS (
    SELECT member_id, store, channel, cheque_at, amount - discount AS net, refunded
    FROM {purchases}
    WHERE status = 'confirmed' AND member_id IN (SELECT member_id FROM {members})
),
totals AS (
    SELECT member_id, count(*) AS purchases_count, sum(net) AS purchases_total,
           sum(refunded) AS refunds_total, min(cheque_at) AS first_purchase_at,
           max(cheque_at) AS last_purchase_at
    FROM p GROUP BY member_id
),
store_spend AS (
    SELECT member_id, store, sum(net - refunded) AS spend
    FROM p WHERE store IS NOT NULL GROUP BY member_id, store
),
category_spend AS (
    SELECT member_id, category, sum(amount - discount - refunded_amount) AS spend
    FROM {purchase_lines}
    WHERE status = 'confirmed' AND category IS NOT NULL
      AND member_id IN (SELECT member_id FROM {members})
    GROUP BY member_id, category
),
ranked AS (
    SELECT member_id, 'store' AS kind, store AS value,
           row_number() OVER (PARTITION BY member_id ORDER BY spend DESC, store) AS rn
    FROM store_spend
    UNION ALL
    SELECT member_id, 'category' AS kind, category AS value,
           row_number() OVER (PARTITION BY member_id ORDER BY spend DESC, category) AS rn
    FROM category_spend
    UNION ALL
    SELECT member_id, 'channel' AS kind, channel AS value, 1 AS rn
    FROM (SELECT DISTINCT member_id, channel FROM p) c
)
SELECT t.member_id AS member_id, t.purchases_count AS purchases_count,
       t.purchases_total AS purchases_total, t.refunds_total AS refunds_total,
       t.first_purchase_at AS first_purchase_at, t.last_purchase_at AS last_purchase_at,
       r.kind AS kind, r.value AS value, r.rn AS rn
FROM totals t LEFT JOIN ranked r ON r.member_id = t.member_id
WHERE r.rn IS NULL OR r.rn <= 3
"""

_ACTIVITY_SQL = """
SELECT member_id,
       max(CASE WHEN type IN $visits AND source = 'mobile_app' THEN occurred_at END) AS last_app_visit_at,
       max(CASE WHEN type IN $visits AND (source IS NULL OR source <> 'mobile_app')
                THEN occurred_at END) AS last_site_visit_at,
       max(CASE WHEN type = 'message.opened' THEN occurred_at END) AS last_message_opened_at,
       max(CASE WHEN type = 'message.clicked' THEN occurred_at END) AS last_message_clicked_at,
       max(occurred_at) AS last_activity_at
FROM {events}
WHERE member_id IN (SELECT member_id FROM {members})
GROUP BY member_id
"""

_SOURCES_SQL = """
SELECT DISTINCT member_id, kind, source FROM (
    SELECT member_id, CASE WHEN type LIKE 'purchase.%' THEN 'purchase' ELSE 'other' END AS kind, source
    FROM {events}
    WHERE member_id IN (SELECT member_id FROM {members}) AND source IS NOT NULL
) s
"""


def _members_data(ids: Iterable[int]) -> dict[str, dict[str, list[int]]]:
    return {"members": {"member_id": sorted({int(i) for i in ids})}}


def purchase_features(wh: Warehouse, member_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Purchase features of these members, recomputed from the purchases (one query)."""
    data = _members_data(member_ids)
    if not data["members"]["member_id"]:
        return {}
    out: dict[int, dict[str, Any]] = {}
    for row in wh.query(_PURCHASE_SQL, data=data):
        member = out.get(row["member_id"])
        if member is None:
            count = int(row["purchases_count"])
            total = quantize(Decimal(row["purchases_total"] or 0))
            refunds = quantize(Decimal(row["refunds_total"] or 0))
            member = out[row["member_id"]] = {
                "purchases_count": count,
                "purchases_total": total,
                "refunds_total": refunds,
                "ltv": total - refunds,
                "avg_cheque": quantize(total / count) if count else None,
                "first_purchase_at": row["first_purchase_at"],
                "last_purchase_at": row["last_purchase_at"],
                "_ranked": {"store": [], "category": [], "channel": []},
            }
        if row["kind"] is not None and row["value"] is not None:
            member["_ranked"][row["kind"]].append((int(row["rn"]), row["value"]))
    for member in out.values():
        ranked = member.pop("_ranked")
        member["favourite_stores"] = [v for _, v in sorted(ranked["store"])][:TOP]
        member["favourite_categories"] = [v for _, v in sorted(ranked["category"])][:TOP]
        member["purchase_channels"] = sorted({v for _, v in ranked["channel"]})
    return out


def activity_features(wh: Warehouse, member_ids: Iterable[int]) -> dict[int, Activity]:
    """Activity of these members recomputed from all their events (after a history rewrite)."""
    data = _members_data(member_ids)
    if not data["members"]["member_id"]:
        return {}
    out: dict[int, Activity] = {}
    for row in wh.query(_ACTIVITY_SQL, {"visits": sorted(VISIT_TYPES)}, data=data):
        out[row["member_id"]] = Activity(times={k: row[k] for k in _ACTIVITY_FIELDS if row[k] is not None})
    for row in wh.query(_SOURCES_SQL, data=data):
        channel = activity_channel("purchase." if row["kind"] == "purchase" else "", row["source"])
        if channel:
            out.setdefault(row["member_id"], Activity()).channels.add(channel)
    return out


_EMPTY_PURCHASES: dict[str, Any] = {
    "purchases_count": 0,
    "purchases_total": ZERO,
    "refunds_total": ZERO,
    "ltv": ZERO,
    "avg_cheque": None,
    "first_purchase_at": None,
    "last_purchase_at": None,
    "favourite_categories": [],
    "favourite_stores": [],
}


def refresh(
    wh: Warehouse,
    *,
    purchase_members: Iterable[int] = (),
    activity: Mapping[int, Activity] | None = None,
    rebuilt_members: Iterable[int] = (),
    removed_members: Iterable[int] = (),
    now: datetime | None = None,
) -> int:
    """Bring the features of the touched members up to date; returns how many rows were written.

    ``purchase_members``: their purchases changed (recomputed). ``activity``: what the batch's
    events showed per member (merged in). ``rebuilt_members``: their history was rewritten
    (everything recomputed). ``removed_members``: merged away (their row is deleted).
    """
    activity = activity or {}
    rebuilt = set(rebuilt_members)
    removed = set(removed_members)
    recompute = (set(purchase_members) | rebuilt) - removed
    members = (recompute | set(activity) | rebuilt) - removed
    if removed:
        wh.delete("member_features", "member_id IN $ids", {"ids": sorted(removed)})
    if not members:
        return 0
    stored = {
        r["member_id"]: r
        for r in wh.query(
            "SELECT * FROM {member_features} WHERE member_id IN (SELECT member_id FROM {members})",
            data=_members_data(members),
        )
    }
    purchases = purchase_features(wh, recompute)
    history = activity_features(wh, rebuilt)
    now = now or utcnow()
    rows = []
    for member_id in sorted(members):
        old = stored.get(member_id)
        row: dict[str, Any] = {"member_id": member_id}
        # Purchase part: recomputed, or kept from the stored row.
        if member_id in recompute:
            computed = purchases.get(member_id)
            row.update({k: v for k, v in (computed or _EMPTY_PURCHASES).items() if k != "purchase_channels"})
            purchase_channels = set(computed["purchase_channels"]) if computed else set()
        else:
            row.update({k: old[k] if old else v for k, v in _EMPTY_PURCHASES.items()})
            purchase_channels = set(old["channels"]) - set(old["activity_channels"]) if old else set()
        # Activity part: rebuilt from events, or the stored values; then the batch merged in.
        if member_id in rebuilt:
            base = history.get(member_id, Activity())
            times: dict[str, datetime | None] = dict(base.times)
            channels = set(base.channels)
        else:
            times = {k: old[k] for k in _ACTIVITY_FIELDS} if old else {}
            channels = set(old["activity_channels"]) if old else set()
        seen = activity.get(member_id)
        if seen is not None:
            for name, value in seen.times.items():
                times[name] = _later(times.get(name), value)
            channels |= seen.channels
        for name in _ACTIVITY_FIELDS:
            row[name] = times.get(name)
        row["last_activity_at"] = _later(row["last_activity_at"], row["last_purchase_at"])
        row["activity_channels"] = sorted(channels)
        row["channels"] = sorted(channels | purchase_channels)
        row["updated_at"] = now
        rows.append(row)
    wh.upsert(MEMBER_FEATURES.name, rows)
    return len(rows)


def member_features(wh: Warehouse, member_id: int) -> dict[str, Any] | None:
    """The stored features of one member, or None when the warehouse knows nothing of them."""
    rows = wh.query("SELECT * FROM {member_features} WHERE member_id = $id", {"id": member_id})
    if not rows:
        return None
    row = rows[0]
    row.pop("activity_channels", None)
    return row


def rebuild_all(wh: Warehouse, batch_size: int = 50_000) -> int:
    """Recomputes every member's features from scratch (after a bulk import), in batches."""
    ids = sorted(
        {
            r["member_id"]
            for table in ("purchases", "events")
            for r in wh.query(f"SELECT DISTINCT member_id FROM {{{table}}} WHERE member_id IS NOT NULL")
        }
    )
    written = 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        with wh.write_lock, wh.transaction():
            written += refresh(wh, rebuilt_members=chunk)
    return written
