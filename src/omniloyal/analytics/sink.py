"""The warehouse sink: the bus consumer that loads every event into the warehouse.

For each batch of envelopes (at-least-once delivery, any order):

1. duplicates are dropped: ids repeated in the batch, and ids already in ``events``;
2. ``purchase.confirmed`` becomes a ``purchases`` row and its ``purchase_lines``;
   ``purchase.refunded`` / ``purchase.cancelled`` become ``purchase_adjustments`` rows, from
   which the refunded amounts and the status of purchases and lines are recomputed (so a
   refund that arrives before its purchase, or twice, still counts once);
3. ``member.registered`` / ``member.updated`` / ``consent.changed`` update the member snapshot
   (an event older than the snapshot is ignored); ``member.merged`` marks the duplicate and
   re-keys all its rows to the member kept;
4. ``identity.linked`` records the link and gives the visitor's anonymous history (the last
   :data:`ANONYMOUS_HISTORY_DAYS` days, and anything arriving later) to the member;
5. the features of every member the batch touched are refreshed;
6. the envelopes themselves are written to ``events`` - last, so that on ClickHouse (no
   transactions) a crash before this point makes the redelivery redo steps 2-5, which are
   idempotent. On DuckDB the whole batch is one transaction.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Container, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import pydantic_core

from omniloyal.analytics import features
from omniloyal.analytics.schema import CONSENT_CHANNELS, EVENTS, UTM_COLUMNS
from omniloyal.analytics.warehouse import Rows, Warehouse, get_warehouse
from omniloyal.events.envelope import EventEnvelope
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.money import ZERO, quantize

CONSUMER_NAME = "warehouse"
# How far back an anonymous visitor's history is given to the member on identify/login.
ANONYMOUS_HISTORY_DAYS = 60
PURCHASE_CONFIRMED = "purchase.confirmed"
PURCHASE_REFUNDED = "purchase.refunded"
PURCHASE_CANCELLED = "purchase.cancelled"
MEMBER_SNAPSHOT_TYPES = frozenset({"member.registered", "member.updated"})
CONSENT_CHANGED = "consent.changed"
MEMBER_MERGED = "member.merged"
IDENTITY_LINKED = "identity.linked"
QUESTIONNAIRE_FIELDS = (
    "external_id",
    "first_name",
    "last_name",
    "middle_name",
    "gender",
    "birth_date",
    "city",
    "phone",
    "email",
)


@dataclass
class LoadResult:
    received: int
    loaded: int
    duplicates: int
    # Members whose rows the batch changed.
    members: set[int] = field(default_factory=set)


# ---------------------------------------------------------------- small converters


def _money(value: Any) -> Decimal:
    if value is None or value == "":
        return ZERO
    try:
        return quantize(Decimal(str(value)))
    except InvalidOperation:
        return ZERO


def _qty(value: Any) -> Decimal:
    if value is None or value == "":
        return Decimal("0.000")
    try:
        return quantize(Decimal(str(value)), 3)
    except InvalidOperation:
        return Decimal("0.000")


def _sum_money(values: Any) -> Decimal:
    if isinstance(values, dict):
        return quantize(sum((_money(v) for v in values.values()), ZERO))
    return ZERO


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _json(value: Any) -> str:
    # Compact JSON, non-ASCII kept, anything else as str(): what json.dumps(ensure_ascii=False,
    # separators=(",", ":"), default=str) wrote, a quarter of the cost (datetimes come out as
    # ISO 8601 with a "T"; envelopes off the bus hold only JSON values anyway).
    return pydantic_core.to_json(value, fallback=str).decode()


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else None
    return None


def _date(value: Any) -> Any:
    from datetime import date

    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return None
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v is not None]
    return []


# ---------------------------------------------------------------- steps


def _unique(batch: Iterable[EventEnvelope], known: Container[Hashable] = ()) -> list[EventEnvelope]:
    """The batch without repeated ids, and without the events in ``known`` (id, occurred_at):
    loaded already, as the lookup in ``events`` would find them."""
    seen: set[str] = set()
    out = []
    for event in batch:
        event_id = event.id
        if event_id not in seen and (event_id, event.occurred_at) not in known:
            seen.add(event_id)
            out.append(event)
    return out


def _already_loaded(wh: Warehouse, events: Sequence[EventEnvelope]) -> set[str]:
    # The time range lets both engines skip the storage blocks (DuckDB row groups, ClickHouse
    # partitions and granules) that cannot hold these events: a duplicate has the same time.
    lo = min(e.occurred_at for e in events)
    hi = max(e.occurred_at for e in events)
    rows = wh.query(
        f"SELECT id FROM {wh.qualified('events')} "
        "WHERE occurred_at >= $lo AND occurred_at <= $hi AND id IN (SELECT id FROM {ids})",
        {"lo": lo, "hi": hi},
        data={"ids": {"id": [e.id for e in events]}},
    )
    return {r["id"] for r in rows}


def _merged_into(wh: Warehouse, member_ids: set[int]) -> dict[int, int]:
    if not member_ids:
        return {}
    rows = wh.query(
        "SELECT member_id, merged_into FROM {members} "
        "WHERE merged_into IS NOT NULL AND member_id IN (SELECT member_id FROM {ids})",
        data={"ids": {"member_id": sorted(member_ids)}},
    )
    return {r["member_id"]: r["merged_into"] for r in rows}


def _linked_members(wh: Warehouse, anonymous_ids: set[str]) -> dict[str, int]:
    if not anonymous_ids:
        return {}
    rows = wh.query(
        "SELECT anonymous_id, member_id FROM {identity_links} "
        "WHERE anonymous_id IN (SELECT anonymous_id FROM {ids})",
        data={"ids": {"anonymous_id": sorted(anonymous_ids)}},
    )
    return {r["anonymous_id"]: r["member_id"] for r in rows}


_EVENT_COLUMNS = EVENTS.column_names
_UTM = frozenset(UTM_COLUMNS)
_NO_UTM = (None,) * len(UTM_COLUMNS)
# Properties promoted to columns (``campaign`` also from ``mailing``).
_PROMOTED = frozenset({"sku", "category", "section", "campaign", "mailing"})
_NOT_PROMOTED = (None, None, None, None)


def _event_columns(
    events: Sequence[EventEnvelope], owners: dict[str, int | None], now: datetime
) -> dict[str, Any]:
    """The ``events`` rows of these envelopes as columns: one tuple per event, transposed (no
    dict per row on the way to Arrow); the checks skip what most events lack."""
    rows = []
    for event in events:
        props = event.properties
        keys = props.keys()
        if keys.isdisjoint(_PROMOTED):
            promoted: Sequence[Any] = _NOT_PROMOTED
        else:
            get = props.get
            promoted = (
                _text(get("sku")),
                _text(get("category")),
                _text(get("section")),
                _text(get("campaign") or get("mailing")),
            )
        utm = event.utm
        if not keys.isdisjoint(_UTM):  # utm fields sent as properties
            utm_values: Sequence[Any] = [utm.get(name) or _text(props.get(name)) for name in UTM_COLUMNS]
        elif utm:
            utm_values = tuple(map(utm.get, UTM_COLUMNS))
            if "" in utm_values:
                utm_values = [value or None for value in utm_values]
        else:
            utm_values = _NO_UTM
        rows.append(
            (
                event.id,
                event.type,
                event.occurred_at,
                event.received_at,
                owners[event.id],
                event.anonymous_id,
                event.source,
                event.store,
                *promoted,
                _json(props),
                *utm_values,
                now,
            )
        )
    return dict(zip(_EVENT_COLUMNS, zip(*rows, strict=True), strict=True))


def _purchase_rows(event: EventEnvelope, member_id: int | None, now: datetime) -> tuple[dict[str, Any], Rows]:
    props = event.properties
    operation = str(props.get("operation") or event.id)
    channel = str(props.get("channel") or event.source or "offline")
    purchase = {
        "operation": operation,
        "operation_id": _text(props.get("operation_id")),
        "event_id": event.id,
        "member_id": member_id,
        "store": event.store,
        "channel": channel,
        "kind": str(props.get("kind") or "purchase"),
        "source": event.source,
        "cheque_number": _text(props.get("cheque_number")),
        "cheque_at": event.occurred_at,
        "amount": _money(props.get("amount")),
        "discount": _money(props.get("discount")),
        "paid": _money(props.get("paid", props.get("amount"))),
        "points_accrued": _sum_money(props.get("accrual")),
        "points_written_off": _sum_money(props.get("write_off")),
        "accrual": _json(props.get("accrual") or {}),
        "write_off": _json(props.get("write_off") or {}),
        "payments": _json(props.get("payments") or []),
        "refunded": ZERO,
        "status": "confirmed",
        "cancelled_at": None,
        "updated_at": now,
    }
    lines = []
    for index, line in enumerate(props.get("lines") or [], start=1):
        if not isinstance(line, dict) or not line.get("sku"):
            continue
        lines.append(
            {
                "operation": operation,
                "line": int(line.get("line") or index),
                "member_id": member_id,
                "sku": str(line["sku"]),
                "category": _text(line.get("category")),
                "store": event.store,
                "channel": channel,
                "cheque_at": event.occurred_at,
                "price": _money(line.get("price")),
                "quantity": _qty(line.get("quantity")),
                "amount": _money(line.get("amount")),
                "discount": _money(line.get("discount")),
                "refunded_quantity": Decimal("0.000"),
                "refunded_amount": ZERO,
                "status": "confirmed",
                "updated_at": now,
            }
        )
    return purchase, lines


def _adjustment_rows(event: EventEnvelope, member_id: int | None, now: datetime) -> Rows:
    props = event.properties
    base = {
        "member_id": member_id,
        "adjusted_at": event.occurred_at,
        "event_id": event.id,
        "updated_at": now,
    }
    if event.type == PURCHASE_CANCELLED:
        operation = str(props.get("operation") or event.id)
        purchase = str(props.get("purchase_operation") or operation)
        return [
            {
                **base,
                "purchase_operation": purchase,
                "operation": operation,
                "kind": "cancel",
                "line": 0,
                "sku": None,
                "quantity": Decimal("0.000"),
                "amount": ZERO,
            }
        ]
    operation = str(props.get("operation") or event.id)
    purchase = str(props.get("purchase_operation") or "")
    if not purchase:
        return []
    lines = [line for line in props.get("lines") or [] if isinstance(line, dict)]
    rows = [
        {
            **base,
            "purchase_operation": purchase,
            "operation": operation,
            "kind": "refund",
            "line": int(line.get("line") or 0),
            "sku": _text(line.get("sku")),
            "quantity": _qty(line.get("quantity")),
            "amount": _money(line.get("amount")),
        }
        for line in lines
    ]
    if not rows:  # a refund of money without lines
        rows = [
            {
                **base,
                "purchase_operation": purchase,
                "operation": operation,
                "kind": "refund",
                "line": 0,
                "sku": None,
                "quantity": Decimal("0.000"),
                "amount": _money(props.get("amount")),
            }
        ]
    return rows


def _apply_adjustments(
    wh: Warehouse,
    operations: set[str],
    new_purchases: dict[str, dict[str, Any]],
    new_lines: Rows,
    now: datetime,
) -> set[int]:
    """Recompute refunded amounts and status of these purchases from all their adjustments.

    Purchases of this batch are changed before they are inserted; stored ones are updated.
    Returns the members whose purchases changed."""
    if not operations:
        return set()
    adjustments = wh.query(
        "SELECT purchase_operation, kind, line, quantity, amount, adjusted_at FROM {purchase_adjustments} "
        "WHERE purchase_operation IN (SELECT operation FROM {ops})",
        data={"ops": [{"operation": o} for o in sorted(operations)]},
    )
    refunded: dict[str, Decimal] = {}
    cancelled: dict[str, datetime] = {}
    line_refunds: dict[tuple[str, int], tuple[Decimal, Decimal]] = {}
    for adj in adjustments:
        op = adj["purchase_operation"]
        if adj["kind"] == "cancel":
            at = adj["adjusted_at"]
            cancelled[op] = min(at, cancelled.get(op, at))
            continue
        refunded[op] = refunded.get(op, ZERO) + adj["amount"]
        if adj["line"]:
            qty, money = line_refunds.get((op, adj["line"]), (Decimal("0.000"), ZERO))
            line_refunds[(op, adj["line"])] = (qty + adj["quantity"], money + adj["amount"])
    changes: Rows = [
        {
            "operation": op,
            "refunded": quantize(refunded.get(op, ZERO)),
            "status": "cancelled" if op in cancelled else "confirmed",
            "cancelled_at": cancelled.get(op),
            "updated_at": now,
        }
        for op in sorted(operations)
    ]
    for change in changes:
        purchase = new_purchases.get(str(change["operation"]))
        if purchase is not None:
            purchase.update(change)
    for line in new_lines:
        if line["operation"] in operations:
            qty, money = line_refunds.get((line["operation"], line["line"]), (Decimal("0.000"), ZERO))
            line.update(
                refunded_quantity=quantize(qty, 3),
                refunded_amount=quantize(money),
                status="cancelled" if line["operation"] in cancelled else "confirmed",
            )
    stored_ops = sorted(operations - set(new_purchases))
    touched: set[int] = set()
    if stored_ops:
        stored = wh.query(
            "SELECT operation, member_id FROM {purchases} WHERE operation IN (SELECT operation FROM {ops})",
            data={"ops": [{"operation": o} for o in stored_ops]},
        )
        touched = {r["member_id"] for r in stored if r["member_id"] is not None}
        wh.update(
            "purchases",
            [c for c in changes if c["operation"] in set(stored_ops)],
            ["refunded", "status", "cancelled_at", "updated_at"],
        )
        stored_lines = wh.query(
            "SELECT operation, line FROM {purchase_lines} WHERE operation IN (SELECT operation FROM {ops})",
            data={"ops": [{"operation": o} for o in stored_ops]},
        )
        line_changes = []
        for line in stored_lines:
            qty, money = line_refunds.get((line["operation"], line["line"]), (Decimal("0.000"), ZERO))
            line_changes.append(
                {
                    "operation": line["operation"],
                    "line": line["line"],
                    "refunded_quantity": quantize(qty, 3),
                    "refunded_amount": quantize(money),
                    "status": "cancelled" if line["operation"] in cancelled else "confirmed",
                    "updated_at": now,
                }
            )
        wh.update(
            "purchase_lines", line_changes, ["refunded_quantity", "refunded_amount", "status", "updated_at"]
        )
    return touched


_EMPTY_MEMBER: dict[str, Any] = {
    "external_id": None,
    "status": "active",
    "first_name": None,
    "last_name": None,
    "middle_name": None,
    "gender": None,
    "birth_date": None,
    "city": None,
    "phone": None,
    "email": None,
    "children": "[]",
    "pets": [],
    "preferred_categories": [],
    "attributes": "{}",
    "consents": "{}",
    **{f"consent_{c}": None for c in CONSENT_CHANNELS},
    "created_at": None,
    "merged_into": None,
}


def _apply_questionnaire(row: dict[str, Any], member: dict[str, Any]) -> None:
    for name in QUESTIONNAIRE_FIELDS:
        if name in member:
            row[name] = _date(member[name]) if name == "birth_date" else _text(member[name])
    if "children" in member:
        row["children"] = _json(member["children"] or [])
    if "pets" in member:
        row["pets"] = _strings(member["pets"])
    if "preferred_categories" in member:
        row["preferred_categories"] = _strings(member["preferred_categories"])
    if "attributes" in member:
        row["attributes"] = _json(member["attributes"] or {})
    if member.get("status"):
        row["status"] = str(member["status"])
    created = _time(member.get("created_at") or member.get("registered_at"))
    if created is not None:
        row["created_at"] = created
    if isinstance(member.get("consents"), dict):
        consents = {}
        for channel, value in member["consents"].items():
            granted = value.get("granted") if isinstance(value, dict) else value
            consents[channel] = value if isinstance(value, dict) else {"granted": bool(value)}
            if channel in CONSENT_CHANNELS:
                row[f"consent_{channel}"] = None if granted is None else bool(granted)
        row["consents"] = _json(consents)


def _load_members(wh: Warehouse, events: Sequence[EventEnvelope], now: datetime) -> tuple[set[int], set[int]]:
    """Member snapshots; returns (merged-away members, members kept by a merge)."""
    relevant = [
        e
        for e in events
        if ((e.type in MEMBER_SNAPSHOT_TYPES or e.type == CONSENT_CHANGED) and e.member_id is not None)
        or e.type == MEMBER_MERGED
    ]
    if not relevant:
        return set(), set()
    ids: set[int] = set()
    for e in relevant:
        if e.type == MEMBER_MERGED:
            for key in ("merged_member_id", "kept_member_id"):
                if e.properties.get(key) is not None:
                    ids.add(int(e.properties[key]))
        elif e.member_id is not None:
            ids.add(e.member_id)
    current = {
        r["member_id"]: r
        for r in wh.query(
            "SELECT * FROM {members} WHERE member_id IN (SELECT member_id FROM {ids})",
            data={"ids": [{"member_id": m} for m in sorted(ids)]},
        )
    }
    changed: dict[int, dict[str, Any]] = {}
    merged: set[int] = set()
    kept: set[int] = set()

    def snapshot(member_id: int, at: datetime) -> dict[str, Any]:
        row = changed.get(member_id) or current.get(member_id)
        if row is None:
            row = {"member_id": member_id, **_EMPTY_MEMBER, "snapshot_at": at}
        row = dict(row)
        changed[member_id] = row
        return row

    for e in sorted(relevant, key=lambda e: (e.occurred_at, e.id)):
        if e.type == MEMBER_MERGED:
            dup, keep = e.properties.get("merged_member_id"), e.properties.get("kept_member_id")
            if dup is None or keep is None:
                continue
            row = snapshot(int(dup), e.occurred_at)
            row.update(status="merged", merged_into=int(keep))
            row["snapshot_at"] = max(row["snapshot_at"], e.occurred_at)
            merged.add(int(dup))
            kept.add(int(keep))
            continue
        assert e.member_id is not None
        existing = changed.get(e.member_id) or current.get(e.member_id)
        if existing is not None and e.occurred_at < existing["snapshot_at"]:
            continue  # an older fact arriving late: the snapshot already says more
        row = snapshot(e.member_id, e.occurred_at)
        if e.type == CONSENT_CHANGED:
            channel = str(e.properties.get("channel") or "")
            granted = bool(e.properties.get("granted"))
            consents = json.loads(row["consents"] or "{}")
            consents[channel] = {
                "granted": granted,
                "at": e.occurred_at.isoformat(),
                "source": e.properties.get("source"),
            }
            row["consents"] = _json(consents)
            if channel in CONSENT_CHANNELS:
                row[f"consent_{channel}"] = granted
        else:
            member = e.properties.get("member")
            if isinstance(member, dict):
                _apply_questionnaire(row, member)
        row["snapshot_at"] = e.occurred_at
    for row in changed.values():
        row["updated_at"] = now
    wh.upsert("members", list(changed.values()))
    return merged, kept


_MEMBER_TABLES = ("events", "purchases", "purchase_lines", "purchase_adjustments", "identity_links")


def _rekey_members(wh: Warehouse, mapping: dict[int, int], now: datetime) -> None:
    """Every row of a merged-away member now belongs to the member kept."""
    if not mapping:
        return
    version = {"events": "loaded_at"}

    def transform(table: str) -> Any:
        column = version.get(table, "updated_at")

        def apply(rows: Rows) -> Rows:
            return [{**r, "member_id": mapping[r["member_id"]], column: now} for r in rows]

        return apply

    for table in _MEMBER_TABLES:
        wh.rewrite(table, "member_id IN $ids", {"ids": sorted(mapping)}, transform(table))


def _link_anonymous(wh: Warehouse, links: dict[str, tuple[int, datetime]], now: datetime) -> set[int]:
    """Anonymous history (recent) moves to the member; returns the members given history."""
    if not links:
        return set()
    since = min(at for _, at in links.values()) - timedelta(days=ANONYMOUS_HISTORY_DAYS)

    def apply(rows: Rows) -> Rows:
        return [{**r, "member_id": links[r["anonymous_id"]][0], "loaded_at": now} for r in rows]

    moved = wh.rewrite(
        "events",
        "member_id IS NULL AND anonymous_id IN $anons AND occurred_at >= $since",
        {"anons": sorted(links), "since": since},
        apply,
    )
    return {m for m, _ in links.values()} if moved else set()


# ---------------------------------------------------------------- the consumer


def load(wh: Warehouse, batch: Sequence[EventEnvelope], *, refresh_features: bool = True) -> LoadResult:
    """Loads a batch of envelopes into the warehouse; repeats and replays change nothing.

    ``refresh_features=False`` (bulk imports) leaves the features to one
    :func:`features.refresh` at the end; ``LoadResult.members`` says whose to refresh."""
    # Events this process loaded lately (same id, same time) need no lookup: the other consumer
    # of the same batch (the segments one loads it too) or a redelivery usually finds them all
    # there, without waiting for the write lock. Looked at again under the lock: the other may
    # have just loaded them.
    recent = wh.loaded_events
    events = _unique(batch, recent.keys)
    if not events:
        return LoadResult(received=len(batch), loaded=0, duplicates=len(batch))
    with wh.write_lock, wh.transaction():
        events = _unique(events, recent.keys)
        if events:
            loaded = _already_loaded(wh, events)
            events = [e for e in events if e.id not in loaded]
        if not events:
            return LoadResult(received=len(batch), loaded=0, duplicates=len(batch))
        now = utcnow()

        # Who each event belongs to: merged members resolve to the member kept, linked
        # anonymous visitors to their member.
        links: dict[str, tuple[int, datetime]] = {}
        link_events: dict[str, str] = {}
        identified = [e for e in events if e.type == IDENTITY_LINKED]
        for e in sorted(identified, key=lambda e: (e.occurred_at, e.id)):  # the newest link wins
            anonymous_id = e.properties.get("anonymous_id") or e.anonymous_id
            if e.member_id is not None and anonymous_id:
                links[str(anonymous_id)] = (e.member_id, e.occurred_at)
                link_events[str(anonymous_id)] = e.id
        if links:  # a link older than the one stored (delivered late) changes nothing
            stored = wh.query(
                "SELECT anonymous_id, linked_at FROM {identity_links} "
                "WHERE anonymous_id IN (SELECT a FROM {ids})",
                data={"ids": {"a": sorted(links)}},
            )
            for row in stored:
                if row["linked_at"] > links[row["anonymous_id"]][1]:
                    del links[row["anonymous_id"]]
        merges = {
            int(e.properties["merged_member_id"]): int(e.properties["kept_member_id"])
            for e in events
            if e.type == MEMBER_MERGED
            and e.properties.get("merged_member_id") is not None
            and e.properties.get("kept_member_id") is not None
        }
        redirect = _merged_into(wh, {e.member_id for e in events if e.member_id is not None})
        redirect.update(merges)
        anonymous = {e.anonymous_id for e in events if e.member_id is None and e.anonymous_id}
        linked = _linked_members(wh, anonymous - set(links))
        linked.update({a: m for a, (m, _) in links.items()})

        def resolve(member: int | None) -> int | None:
            seen: set[int] = set()
            while member is not None and member in redirect and member not in seen:
                seen.add(member)
                member = redirect[member]
            return member

        def member_of(e: EventEnvelope) -> int | None:
            if e.type == MEMBER_MERGED:
                return e.member_id
            member = e.member_id
            if member is None and e.anonymous_id:
                member = linked.get(e.anonymous_id)
            return resolve(member)

        owners = {e.id: member_of(e) for e in events}
        # A visitor linked to a member merged away (in this batch or before) belongs to the one kept.
        links = {a: (resolve(m) or m, at) for a, (m, at) in links.items()}

        # Purchases, lines, refunds and cancellations.
        purchases: dict[str, dict[str, Any]] = {}
        lines: Rows = []
        adjustments: Rows = []
        for e in events:
            if e.type == PURCHASE_CONFIRMED:
                purchase, purchase_lines = _purchase_rows(e, owners[e.id], now)
                purchases[purchase["operation"]] = purchase
                lines.extend(purchase_lines)
            elif e.type in (PURCHASE_REFUNDED, PURCHASE_CANCELLED):
                adjustments.extend(_adjustment_rows(e, owners[e.id], now))
        if adjustments:
            wh.upsert("purchase_adjustments", adjustments)
        adjusted = {a["purchase_operation"] for a in adjustments}
        if purchases:
            # A refund or cancellation may have arrived before its purchase.
            early = wh.query(
                "SELECT DISTINCT purchase_operation FROM {purchase_adjustments} "
                "WHERE purchase_operation IN (SELECT operation FROM {ops})",
                data={"ops": [{"operation": o} for o in purchases]},
            )
            adjusted |= {r["purchase_operation"] for r in early}
        # Members with a refund or cancellation in the batch are recomputed from their purchases;
        # new purchases of the others are added to their sums (features.refresh).
        purchase_members = _apply_adjustments(wh, adjusted, purchases, lines, now)
        purchase_members |= {a["member_id"] for a in adjustments if a["member_id"] is not None}
        purchase_members |= {
            p["member_id"] for o, p in purchases.items() if o in adjusted and p["member_id"] is not None
        }
        added = features.purchase_deltas(
            [p for o, p in purchases.items() if o not in adjusted],
            [line for line in lines if line["operation"] not in adjusted],
        )
        if purchases:
            wh.insert("purchases", list(purchases.values()))
        if lines:
            wh.insert("purchase_lines", lines)

        # Member snapshots, merges, identity links.
        merged, kept = _load_members(wh, events, now)
        _rekey_members(wh, merges, now)
        if links:
            wh.upsert(
                "identity_links",
                [
                    {
                        "anonymous_id": a,
                        "member_id": m,
                        "linked_at": at,
                        "event_id": link_events[a],
                        "updated_at": now,
                    }
                    for a, (m, at) in links.items()
                ],
            )
        relinked = _link_anonymous(wh, links, now)

        # Features of every member touched.
        activity: dict[int, features.Activity] = {}
        for e in events:
            member = owners[e.id]
            if member is not None:
                activity.setdefault(member, features.Activity()).see(e.type, e.source, e.occurred_at)
        if refresh_features:
            features.refresh(
                wh,
                purchase_members=purchase_members,
                added=added,
                activity=activity,
                rebuilt_members=relinked | kept,
                removed_members=merged - kept,
                now=now,
            )
        elif merged - kept:
            wh.delete("member_features", "member_id IN $ids", {"ids": sorted(merged - kept)})

        # The envelopes, last (see the module docs).
        wh.insert("events", _event_columns(events, owners, now))
        keys = [(e.id, e.occurred_at) for e in events]
        wh.after_commit(lambda: recent.add(keys))
        return LoadResult(
            received=len(batch),
            loaded=len(events),
            duplicates=len(batch) - len(events),
            members=(purchase_members | set(added) | set(activity) | relinked | kept) - (merged - kept),
        )


def handler_for(wh: Warehouse) -> Callable[[list[EventEnvelope]], None]:
    """A consumer ``handler(batch)`` that loads into ``wh``."""

    def handle(batch: list[EventEnvelope]) -> None:
        load(wh, batch)

    return handle


def handler_factory(settings: Any, _db: Any = None) -> Callable[[list[EventEnvelope]], None]:
    """The consumer runtime's factory: a handler loading into the settings' warehouse.

    The warehouse is opened at the first batch, not here: a warehouse that cannot be opened
    (a DuckDB file locked by another process) fails batches, which the bus retries, instead of
    stopping the whole runtime from starting."""

    def handle(batch: list[EventEnvelope]) -> None:
        load(get_warehouse(settings), batch)

    return handle


def handle(batch: list[EventEnvelope]) -> None:
    """A handler for the process settings' warehouse (``OMNILOYAL_WAREHOUSE_URL``)."""
    from omniloyal.settings import get_settings

    load(get_warehouse(get_settings()), batch)


def _register() -> None:
    """Registers the sink with the event runtime as the consumer ``warehouse`` (all types)."""
    try:
        consumers = importlib.import_module("omniloyal.events.consumers")
    except ImportError:  # no consumer runtime: the sink is called directly
        return
    if hasattr(consumers, "register_factory"):
        consumers.register_factory(CONSUMER_NAME, handler_factory, types=("#",))
    else:
        consumers.register(CONSUMER_NAME, handle, types=("#",))


_register()
