"""The loyalty side's facts segments filter on, mirrored into the warehouse.

Balances per currency, card states, member status and contact quality, and target audience
membership live in the operational store; segments are evaluated in the warehouse. This module
copies them over through the loyalty side's public service functions only:

* for the members a batch of events touched (``refresh_members``, called by the freshness
  consumer on ``points.*``, ``card.*``, ``member.*``, ``consent.changed`` and purchases);
* for a whole target audience when ``target_audience.changed`` arrives (``sync_audience``);
* directly after a segment export changed an audience (``mirror_audience``), so a segment on
  "member of audience X" sees the export at once;
* for everyone (``rebuild``), to start from an existing operational store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache

import pyarrow as pa

from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import NotFound
from omniloyal.ledger import service as ledger
from omniloyal.members import quality
from omniloyal.members import service as members
from omniloyal.offers import service as offers
from omniloyal.segments import tables

# Event types after which a member's loyalty facts are read again.
LOYALTY_PREFIXES = ("points.", "card.", "member.", "consent.", "purchase.")

# Audience versions this process mirrored itself (code -> updated_at): their
# ``target_audience.changed`` event needs no full resync.
_mirrored: dict[str, datetime] = {}
_mirrored_lock = threading.Lock()


@lru_cache(maxsize=65536)
def _phone_facts(phone: str) -> tuple[bool, bool]:
    """(valid, mobile) of a stored phone: parsing is the costly part of a mirror, and phones repeat."""
    checked = quality.check_phone(phone)
    valid = checked.status == quality.VALID
    return valid, valid and checked.type in quality.SMS_TYPES


@lru_cache(maxsize=65536)
def _email_valid(email: str) -> bool:
    return quality.check_email(email).status == quality.VALID


def refresh_members(db: Database, wh: Warehouse, member_ids: Iterable[int]) -> int:
    """Reads these members' loyalty facts again; returns how many members were mirrored."""
    ids = sorted(set(member_ids))
    if not ids:
        return 0
    tables.ensure(wh)
    now = utcnow()
    facts = members.contact_facts(db, ids)
    balances = ledger.members_balances(db, ids, now)
    loyalty_rows: list[dict[str, object]] = []
    card_rows: list[dict[str, object]] = []
    balance_rows: list[dict[str, object]] = []
    for member_id in ids:
        member = facts.get(member_id)
        if member is None:  # gone (merged away): its rows are removed below
            continue
        phone_valid, phone_mobile = _phone_facts(member.phone) if member.phone else (False, False)
        loyalty_rows.append(
            {
                "member_id": member_id,
                "status": member.status,
                "phone_valid": phone_valid,
                "phone_mobile": phone_mobile,
                "email_valid": _email_valid(member.email) if member.email else False,
                "updated_at": now,
            }
        )
        card_rows.extend(
            {"member_id": member_id, "card": number, "state": state, "blocked": blocked, "updated_at": now}
            for number, state, blocked in member.cards
        )
        balance_rows.extend(
            {"member_id": member_id, "currency": b.currency, "balance": b.available, "updated_at": now}
            for b in balances.get(member_id, ())
        )
    id_list = ", ".join(str(i) for i in ids)
    where = f"member_id IN ({id_list})"
    with wh.write_lock, wh.transaction():
        # Cards and balances are replaced whole per member (a card moved away, a currency gone).
        tables.replace_where(wh, "member_loyalty", where, loyalty_rows)
        tables.replace_where(wh, "member_cards", where, card_rows)
        tables.replace_where(wh, "member_balances", where, balance_rows)
    return len(loyalty_rows)


def audience_member_ids(db: Database, code: str) -> list[int]:
    """Every member of a target audience (the loyalty side's paged listing)."""
    ids: list[int] = []
    cursor: str | None = None
    while True:
        page = offers.list_audience_members(db, code, 500, cursor)
        ids.extend(item.member_id for item in page.items)
        cursor = page.next_cursor
        if not cursor:
            return ids


def sync_audience(db: Database, wh: Warehouse, code: str) -> int:
    """Mirrors a whole target audience (gone audience: emptied). Returns its size."""
    tables.ensure(wh)
    try:
        ids = audience_member_ids(db, code)
    except NotFound:
        ids = []
    now = utcnow()
    rows = [{"audience": code, "member_id": i, "updated_at": now} for i in ids]
    with wh.write_lock, wh.transaction():
        tables.replace_where(wh, "audience_members", f"audience = {tables.escape(wh.lit(code))}", rows)
    return len(ids)


def mirror_audience(
    wh: Warehouse,
    code: str,
    *,
    added: Sequence[int] = (),
    removed: Sequence[int] = (),
    version: datetime | None = None,
) -> None:
    """Applies a change this process made to an audience (an export) to the mirror."""
    tables.ensure(wh)
    now = utcnow()
    with wh.write_lock, wh.transaction():
        if removed:
            tables.delete_keys(wh, "audience_members", [{"audience": code, "member_id": i} for i in removed])
        if added:
            tables.upsert(
                wh, "audience_members", [{"audience": code, "member_id": i, "updated_at": now} for i in added]
            )
    if version is not None:
        with _mirrored_lock:
            _mirrored[code] = version


def replace_audience(
    wh: Warehouse, code: str, ids: Sequence[int], *, version: datetime | None = None
) -> None:
    """The mirror of an audience becomes exactly ``ids`` (after a replace)."""
    tables.ensure(wh)
    now = utcnow()
    rows = pa.table(
        {
            "audience": pa.array([code] * len(ids), pa.string()),
            "member_id": pa.array(ids, pa.int64()),
            "updated_at": pa.array([now] * len(ids), pa.timestamp("us", tz="UTC")),
        }
    )
    with wh.write_lock, wh.transaction():
        tables.replace_where(wh, "audience_members", f"audience = {tables.escape(wh.lit(code))}", rows)
    if version is not None:
        with _mirrored_lock:
            _mirrored[code] = version


def already_mirrored(code: str, version: datetime) -> bool:
    with _mirrored_lock:
        return _mirrored.get(code) == version


def rebuild(db: Database, wh: Warehouse) -> int:
    """Mirrors every member and every audience (start from an existing operational store)."""
    count = 0
    cursor: str | None = None
    while True:
        page = members.list_members(db, 500, cursor)
        count += refresh_members(db, wh, [m.id for m in page.items])
        cursor = page.next_cursor
        if not cursor:
            break
    cursor = None
    while True:
        audiences = offers.list_audiences(db, 500, cursor)
        for audience in audiences.items:
            sync_audience(db, wh, audience.code)
        cursor = audiences.next_cursor
        if not cursor:
            break
    return count
