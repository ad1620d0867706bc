"""Merging a duplicate member into the member kept, and answering lookups of a merged member.

One transaction moves everything the duplicate has to the kept member:

* **cards**: all of them. The kept member's activated card stays activated; the duplicate's
  activated card of the same kind goes back to ``issued`` (a member has at most one activated
  card of a kind): it still identifies the member at a till and earns points, and can be
  blocked or replaced as usual. An activated card of a kind the kept member lacks stays activated.
* **points**: per currency, the duplicate's lots, postings and held reservations move to the
  kept member's account (which is created by simply handing over the duplicate's account when
  the kept member has none). Postings only change account, so every entry still sums to zero
  and the kept balance is the sum of both.
* **consents**: per channel, the latest decision of the two wins.
* **questionnaire**: the kept member's values win; empty ones are filled from the duplicate
  (contacts and the external id included, when the kept member has none); lists are united;
  custom attributes missing on the kept member are copied; the earlier registration date stays.
* **history**: every other row that references the member (operations, ledger entries,
  ingested events, offer uses, target audiences, visitor links, client keys, and tables added
  later) is re-keyed; where the kept member already has the same row (one audience twice) the
  duplicate's copy is dropped, offer uses are added up.

The duplicate keeps its row with ``status = "merged"`` and ``merged_into_id``; its remaining
identifiers (a second phone, say) keep answering, with the kept member (:func:`resolve`).
A ``member.merged`` event and an audit record are written in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    Column,
    CursorResult,
    ForeignKey,
    Table,
    UniqueConstraint,
    and_,
    delete,
    exists,
    select,
    update,
)
from sqlalchemy.orm import Session

from omniloyal.auth.schemas import Principal
from omniloyal.auth.service import record_audit
from omniloyal.db.base import Base, import_all_models
from omniloyal.db.engine import Database
from omniloyal.events.outbox import emit
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError, Conflict, not_found
from omniloyal.ledger.models import Account, Lot, Posting, Reservation
from omniloyal.members import quality
from omniloyal.members.models import Card, Member, MemberConsent, MemberContactKey

# A merged member points at the kept one, which may itself be merged later: follow at most this far.
MAX_CHAIN = 16

# Questionnaire fields filled from the duplicate when the kept member has none.
_FILLED = ("first_name", "last_name", "middle_name", "gender", "birth_date", "address", "city", "timezone")
_IDENTIFIERS = ("phone", "email", "external_id")
_LISTS = ("children", "pets", "preferred_categories")
# Tables handled by hand; every other reference to members.id is re-keyed generically.
_BY_HAND = frozenset({"cards", "accounts", "member_consents", "member_contact_keys", "offer_uses"})


class MergeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    duplicate_id: int = Field(description="The member merged away; the member in the path is kept")


class MergeOut(BaseModel):
    kept_member_id: int
    merged_member_id: int
    # What moved: {"cards": 2, "accounts": 1, "lots": 3, "operations": 5, ...}
    moved: dict[str, int]
    # Cards of the duplicate put back to "issued" (the kept member had an activated card of the kind).
    deactivated_cards: list[str]
    # Questionnaire fields filled from the duplicate.
    filled: list[str]


def resolve_merged(session: Session, member_ids: Iterable[int]) -> dict[int, int]:
    """``{merged member id: the member that now holds it}`` for those of ``member_ids`` that were
    merged (members that were not are left out): one query per link of the chain."""
    result: dict[int, int] = {}
    current = {i: i for i in member_ids if i is not None}
    for _ in range(MAX_CHAIN):
        if not current:
            break
        rows = session.execute(
            select(Member.id, Member.merged_into_id).where(
                Member.id.in_(set(current.values())), Member.merged_into_id.is_not(None)
            )
        ).all()
        into_of = {member_id: into for member_id, into in rows}
        following: dict[int, int] = {}
        for start, now in current.items():
            into = into_of.get(now)
            if into is not None:
                result[start] = following[start] = into
        current = following
    return result


def resolve(session: Session, member_id: int | None) -> int | None:
    """The member that answers for ``member_id``: itself, or the member it was merged into."""
    if member_id is None:
        return None
    return resolve_merged(session, [member_id]).get(member_id, member_id)


# ---------------------------------------------------------------- merge


def merge(db: Database, kept_id: int, duplicate_id: int, actor: Principal, region: str = "RU") -> MergeOut:
    with db.transaction() as session:
        return merge_in(session, kept_id, duplicate_id, actor, region)


def _snapshot(member: Member) -> dict[str, Any]:
    return {
        "id": member.id,
        "status": member.status,
        "first_name": member.first_name,
        "last_name": member.last_name,
        "phone": member.phone,
        "email": member.email,
        "external_id": member.external_id,
        "registered_at": member.registered_at,
    }


def merge_in(
    session: Session, kept_id: int, duplicate_id: int, actor: Principal, region: str = "RU"
) -> MergeOut:
    """Merges in the caller's transaction (see the module's documentation)."""
    if kept_id == duplicate_id:
        raise AppError("same_member", "A member cannot be merged into itself", field="duplicate_id")
    # Both rows locked, in id order, so two merges of the same pair never deadlock.
    rows = session.scalars(
        select(Member).where(Member.id.in_([kept_id, duplicate_id])).order_by(Member.id).with_for_update()
    ).all()
    by_id = {m.id: m for m in rows}
    kept, duplicate = by_id.get(kept_id), by_id.get(duplicate_id)
    if kept is None:
        raise not_found("member", kept_id)
    if duplicate is None:
        raise not_found("member", duplicate_id, field="duplicate_id")
    for member, field in ((kept, None), (duplicate, "duplicate_id")):
        if member.merged_into_id is not None:
            raise Conflict(
                "member_merged",
                f"Member {member.id} was already merged into member {member.merged_into_id}",
                field=field,
            )
    before = {"kept": _snapshot(kept), "duplicate": _snapshot(duplicate)}
    moved: dict[str, int] = {}
    deactivated = _move_cards(session, kept, duplicate, moved)
    _move_points(session, kept_id, duplicate_id, moved)
    _move_consents(session, kept_id, duplicate_id, moved)
    _add_offer_uses(session, kept_id, duplicate_id, moved)
    session.execute(delete(MemberContactKey).where(MemberContactKey.member_id == duplicate_id))
    for table, column in _references():
        count = _rekey(session, table, column, kept_id, duplicate_id)
        if count:
            moved[table.name] = moved.get(table.name, 0) + count
    filled = _fill_questionnaire(session, kept, duplicate)
    now = utcnow()
    duplicate.status, duplicate.merged_into_id, duplicate.merged_at = "merged", kept_id, now
    duplicate.updated_at = kept.updated_at = now
    session.flush()
    quality.refresh(session, [kept_id], region)
    properties = {"merged_member_id": duplicate_id, "kept_member_id": kept_id, "moved": moved}
    emit(session, f"member.merged:{duplicate_id}", "member.merged", member_id=kept_id, properties=properties)
    out = MergeOut(
        kept_member_id=kept_id,
        merged_member_id=duplicate_id,
        moved=moved,
        deactivated_cards=deactivated,
        filled=filled,
    )
    record_audit(
        session,
        actor,
        "merge",
        "member",
        kept_id,
        before,
        {"kept": _snapshot(kept), "duplicate": _snapshot(duplicate), **out.model_dump(mode="json")},
    )
    return out


def _move_cards(session: Session, kept: Member, duplicate: Member, moved: dict[str, int]) -> list[str]:
    kinds_active = set(
        session.scalars(select(Card.kind).where(Card.member_id == kept.id, Card.state == "activated"))
    )
    cards = session.scalars(select(Card).where(Card.member_id == duplicate.id).order_by(Card.id)).all()
    deactivated: list[str] = []
    now = utcnow()
    for card in cards:
        if card.state == "activated" and card.kind in kinds_active:
            # At most one activated card of a kind per member: the kept member's stays.
            card.state = "issued"
            deactivated.append(card.number)
            session.flush()
        card.member_id = kept.id
        card.updated_at = now
    session.flush()
    if cards:
        moved["cards"] = len(cards)
    return deactivated


def _move_points(session: Session, kept_id: int, duplicate_id: int, moved: dict[str, int]) -> None:
    accounts = session.scalars(
        select(Account)
        .where(Account.member_id.in_([kept_id, duplicate_id]))
        .order_by(Account.id)
        .with_for_update()
    ).all()
    kept_by_currency = {a.currency: a for a in accounts if a.member_id == kept_id}
    for account in (a for a in accounts if a.member_id == duplicate_id):
        target = kept_by_currency.get(account.currency)
        if target is None:
            account.member_id = kept_id  # the kept member had none in this currency: hand it over
            moved["accounts"] = moved.get("accounts", 0) + 1
            continue
        for model, key in ((Lot, "lots"), (Posting, "postings"), (Reservation, "reservations")):
            count = _rowcount(
                session.execute(
                    update(model).where(model.account_id == account.id).values(account_id=target.id)
                )
            )
            if count:
                moved[key] = moved.get(key, 0) + count
        session.delete(account)
    session.flush()


def _move_consents(session: Session, kept_id: int, duplicate_id: int, moved: dict[str, int]) -> None:
    rows = session.scalars(
        select(MemberConsent).where(MemberConsent.member_id.in_([kept_id, duplicate_id]))
    ).all()
    kept = {r.channel: r for r in rows if r.member_id == kept_id}
    taken = 0
    for row in (r for r in rows if r.member_id == duplicate_id):
        mine = kept.get(row.channel)
        if mine is None:
            session.add(
                MemberConsent(
                    member_id=kept_id,
                    channel=row.channel,
                    granted=row.granted,
                    changed_at=row.changed_at,
                    source=row.source,
                )
            )
            taken += 1
        elif row.changed_at > mine.changed_at:
            # The latest decision wins, whoever made it.
            mine.granted, mine.changed_at, mine.source = row.granted, row.changed_at, row.source
            taken += 1
        session.delete(row)
    session.flush()
    if taken:
        moved["consents"] = taken


def _add_offer_uses(session: Session, kept_id: int, duplicate_id: int, moved: dict[str, int]) -> None:
    table = Base.metadata.tables.get("offer_uses")
    if table is None:
        return
    mine = dict(
        session.execute(select(table.c.offer_id, table.c.uses).where(table.c.member_id == kept_id)).all()
    )
    theirs = session.execute(
        select(table.c.offer_id, table.c.uses).where(table.c.member_id == duplicate_id)
    ).all()
    for offer_id, uses in theirs:
        if offer_id in mine:
            session.execute(
                update(table)
                .where(table.c.offer_id == offer_id, table.c.member_id == kept_id)
                .values(uses=mine[offer_id] + uses)
            )
        else:
            session.execute(
                update(table)
                .where(table.c.offer_id == offer_id, table.c.member_id == duplicate_id)
                .values(member_id=kept_id)
            )
    session.execute(delete(table).where(table.c.member_id == duplicate_id))
    if theirs:
        moved["offer_uses"] = len(theirs)


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount or 0)


def _references() -> list[tuple[Table, Column[Any]]]:
    """Every column with a foreign key to members.id, but the tables handled by hand."""
    import_all_models()
    found: list[tuple[Table, Column[Any]]] = []
    for table in Base.metadata.sorted_tables:
        if table.name in _BY_HAND:
            continue
        for column in table.columns:
            if any(_points_at_members(fk) for fk in column.foreign_keys):
                found.append((table, column))
    return found


def _points_at_members(fk: ForeignKey) -> bool:
    return fk.target_fullname == "members.id"


def _unique_sets(table: Table, column: Column[Any]) -> list[list[Column[Any]]]:
    """Column sets that must stay unique and contain ``column`` (primary key, unique constraints
    and unconditional unique indexes)."""
    sets: list[list[Column[Any]]] = []
    if column in table.primary_key.columns.values():
        sets.append(list(table.primary_key.columns))
    for constraint in table.constraints:
        columns = list(getattr(constraint, "columns", []))
        unique = constraint is not table.primary_key and isinstance(constraint, UniqueConstraint)
        if unique and column in columns:
            sets.append(columns)
    for index in table.indexes:
        partial = index.dialect_kwargs.get("sqlite_where") is not None or (
            index.dialect_kwargs.get("postgresql_where") is not None
        )
        if index.unique and not partial and column in index.columns.values():
            sets.append(list(index.columns))
    return sets


def _rekey(session: Session, table: Table, column: Column[Any], kept_id: int, duplicate_id: int) -> int:
    """Points the duplicate's rows at the kept member; rows the kept member already has an
    equal of (by a unique key) are dropped instead."""
    condition = column == duplicate_id
    twin = table.alias("twin")
    unique_sets = _unique_sets(table, column)
    for columns in unique_sets:
        others = [c for c in columns if c is not column]
        match = [twin.c[column.name] == kept_id, *(twin.c[c.name] == c for c in others)]
        condition = and_(condition, ~exists().where(*match))
    count = _rowcount(session.execute(update(table).where(condition).values({column.name: kept_id})))
    if unique_sets:
        session.execute(delete(table).where(column == duplicate_id))  # the kept member's twins
    return count or 0


def _fill_questionnaire(session: Session, kept: Member, duplicate: Member) -> list[str]:
    filled: list[str] = []
    for name in _FILLED:
        if getattr(kept, name) in (None, "") and getattr(duplicate, name) not in (None, ""):
            setattr(kept, name, getattr(duplicate, name))
            filled.append(name)
    identifiers = {
        name: getattr(duplicate, name)
        for name in _IDENTIFIERS
        if getattr(kept, name) is None and getattr(duplicate, name) is not None
    }
    if identifiers:
        # Unique columns: the duplicate lets go first.
        for name in identifiers:
            setattr(duplicate, name, None)
        session.flush()
        for name, value in identifiers.items():
            setattr(kept, name, value)
        filled.extend(identifiers)
    for name in _LISTS:
        mine: list[Any] = list(getattr(kept, name) or [])
        extra = [v for v in getattr(duplicate, name) or [] if v not in mine]
        if extra:
            setattr(kept, name, mine + extra)
            filled.append(name)
    attributes = dict(kept.attributes or {})
    missing = {k: v for k, v in (duplicate.attributes or {}).items() if attributes.get(k) is None}
    if missing:
        kept.attributes = {**attributes, **missing}
        filled.extend(f"attributes.{k}" for k in sorted(missing))
    if duplicate.registered_at < kept.registered_at:
        kept.registered_at = duplicate.registered_at
        filled.append("registered_at")
    return filled
