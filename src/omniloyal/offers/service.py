"""Offers and target audiences: the marketer's side.

Offer life cycle (every change is an ``OfferStatusChange`` row and an audit record)::

    draft ──→ active ⇄ paused
      │         │        │
      │         └──→ finished ←┘
      └──────→ archived ←──┘ (from finished)

* ``paused → draft`` is refused: an offer that has run keeps its history honest, and a paused
  offer can be edited in place anyway;
* asking for the status an offer already has changes nothing (a retried request is harmless);
* ``archived`` is final; finished and archived offers can no longer be edited;
* activating (from draft or paused) checks the offer's references again: a store, product
  group or audience may have gone since it was written.

Edits of an active offer take effect at once: ``updated_at`` always moves forward, and the
snapshot loader (``offers/snapshot.py``) rebuilds when the active offers' ``max(updated_at)``
changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar
from uuid import uuid4

from pydantic import TypeAdapter
from sqlalchemy import delete, func, insert, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omniloyal.auth.schemas import Principal
from omniloyal.auth.service import record_audit
from omniloyal.catalog.models import Category, LegalEntity, PaymentMethod, Product, ProductGroup, Store
from omniloyal.db.engine import Database
from omniloyal.events.outbox import emit
from omniloyal.kernel.clock import ensure_utc, utcnow
from omniloyal.kernel.errors import AppError, Conflict, NotFound, not_found
from omniloyal.kernel.money import quantize
from omniloyal.kernel.pagination import Page, cut, paginate
from omniloyal.ledger.models import Currency
from omniloyal.members.models import AttributeDefinition, Card, Member
from omniloyal.offers.models import (
    Offer,
    OfferStatusChange,
    OfferUse,
    TargetAudience,
    TargetAudienceMember,
)
from omniloyal.offers.schemas import (
    AudienceCreate,
    AudienceMemberOut,
    AudienceMembersIn,
    AudienceMembersResult,
    AudienceOut,
    ChainIn,
    MemberAttributeFilter,
    OfferCreate,
    OfferOut,
    OfferUpdate,
    Ref,
    StatusChangeOut,
)

T = TypeVar("T")

# Which status may follow which (see the module docstring).
TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"active", "archived"}),
    "active": frozenset({"paused", "finished"}),
    "paused": frozenset({"active", "finished"}),
    "finished": frozenset({"archived"}),
    "archived": frozenset(),
}
EDITABLE = frozenset({"draft", "active", "paused"})
# Offers that may run (again): the ones whose references must stay valid.
LIVE = ("active", "paused")

# Member fields an offer may compare (besides custom attributes), with their value type.
MEMBER_FIELDS: dict[str, str] = {
    "first_name": "string",
    "last_name": "string",
    "middle_name": "string",
    "gender": "enum",
    "birth_date": "date",
    "city": "string",
    "email": "string",
    "phone": "string",
    "external_id": "string",
    "status": "string",
    "timezone": "string",
    "registered_at": "datetime",
    "children": "list",
    "pets": "list",
    "preferred_categories": "list",
}
_GENDERS = ["male", "female"]
_INTEGER = re.compile(r"[+-]?\d+")

_CHUNK = 5000  # ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits
_chains_adapter = TypeAdapter(list[ChainIn])


def _chunks(values: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _path(loc: Iterable[str | int]) -> str:
    return ".".join(str(part) for part in loc)


def _actor_name(actor: Principal) -> str:
    return f"{actor.role}:{actor.name}"


# ---------------------------------------------------------------- references of chains


def _known(session: Session, kind: str, values: set[str]) -> set[str]:
    """Which of ``values`` exist, for one kind of reference."""
    if kind == "attribute":
        builtin = values & MEMBER_FIELDS.keys()
        rest = sorted(values - builtin)
        return builtin | set(
            session.scalars(select(AttributeDefinition.code).where(AttributeDefinition.code.in_(rest)))
        )
    column: Any = {
        "store": Store.code,
        "payment_method": PaymentMethod.code,
        "product": Product.sku,
        "product_group": ProductGroup.code,
        "category": Category.path,
        "card": Card.number,
        "audience": TargetAudience.code,
        "currency": Currency.code,
        "legal_entity": LegalEntity.code,
    }[kind]
    found: set[str] = set()
    for part in _chunks(sorted(values)):
        found.update(session.scalars(select(column).where(column.in_(part))))
    return found


def _attribute_types(session: Session, names: set[str]) -> dict[str, tuple[str, list[str] | None]]:
    types: dict[str, tuple[str, list[str] | None]] = {
        name: (kind, _GENDERS if name == "gender" else None)
        for name, kind in MEMBER_FIELDS.items()
        if name in names
    }
    rest = sorted(names - types.keys())
    if rest:
        for code, kind, choices in session.execute(
            select(AttributeDefinition.code, AttributeDefinition.type, AttributeDefinition.choices).where(
                AttributeDefinition.code.in_(rest)
            )
        ):
            types[code] = (kind, choices)
    return types


def _fits(kind: str, choices: list[str] | None, value: Any) -> bool:
    """Whether a filter value can be compared with an attribute of this type."""
    text = str(value)
    try:
        if kind == "integer":
            return not isinstance(value, bool) and _INTEGER.fullmatch(text) is not None
        if kind == "decimal":
            return not isinstance(value, bool) and Decimal(text).is_finite()
        if kind == "boolean":
            return isinstance(value, bool) or text in {"true", "false"}
        if kind == "date":
            return isinstance(value, str) and bool(datetime.strptime(value, "%Y-%m-%d"))
        if kind == "datetime":
            return isinstance(value, str) and bool(datetime.fromisoformat(value))
        if kind == "enum":
            return text in (choices or [])
    except (ValueError, ArithmeticError):
        return False
    return True


def check_chains(session: Session, chains: Sequence[ChainIn]) -> None:
    """Refuses a chain naming anything unknown (``unknown_store``, ``unknown_audience``...; 404 with
    the JSON path in ``field``), or comparing an attribute with a value of the wrong type."""
    refs: list[tuple[Ref, str]] = []
    attribute_filters: list[tuple[MemberAttributeFilter, tuple[str | int, ...]]] = []
    for c, chain in enumerate(chains):
        for group, rules in (("filters", chain.filters), ("actions", chain.actions)):
            for r, rule in enumerate(rules):
                prefix: tuple[str | int, ...] = ("chains", c, group, r)
                refs.extend((ref, _path((*prefix, *ref.loc))) for ref in rule.references())
                if isinstance(rule, MemberAttributeFilter):
                    attribute_filters.append((rule, prefix))
    wanted: dict[str, set[str]] = {}
    for ref, _ in refs:
        wanted.setdefault(ref.kind, set()).add(ref.value)
    known = {kind: _known(session, kind, values) for kind, values in wanted.items()}
    for ref, path in refs:
        if ref.value not in known[ref.kind]:
            missing = sorted({r.value for r, _ in refs if r.kind == ref.kind} - known[ref.kind])
            noun = ref.kind.replace("_", " ")
            raise NotFound(
                f"unknown_{ref.kind}",
                f"No {noun} {ref.value!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                field=path,
                details={"values": missing[:20]},
            )
    types = _attribute_types(session, {rule.attribute for rule, _ in attribute_filters})
    for rule, prefix in attribute_filters:
        kind, choices = types[rule.attribute]
        operands = (
            [("value", rule.value)]
            if rule.value is not None
            else [(("values", i), v) for i, v in enumerate(rule.values or ())]
        )
        for where, value in operands:
            if not _fits(kind, choices, value):
                loc = (*prefix, *(where if isinstance(where, tuple) else (where,)))
                hint = f" (one of {', '.join(choices)})" if kind == "enum" and choices else ""
                raise AppError(
                    "invalid_value",
                    f"{value!r} is not a valid {kind} value for {rule.attribute}{hint}",
                    field=_path(loc),
                    status_code=422,
                )


def _stored_chains(row: Offer) -> list[ChainIn]:
    return _chains_adapter.validate_python(row.chains)


# ---------------------------------------------------------------- offers


def _offer_row(session: Session, offer_id: int, *, lock: bool = False) -> Offer:
    offer = session.get(Offer, offer_id, with_for_update=True if lock else None)
    if offer is None:
        raise not_found("offer", offer_id)
    return offer


def _uses(session: Session, ids: Sequence[int]) -> dict[int, int]:
    if not ids:
        return {}
    rows = session.execute(
        select(OfferUse.offer_id, func.sum(OfferUse.uses))
        .where(OfferUse.offer_id.in_(ids))
        .group_by(OfferUse.offer_id)
    )
    return {offer_id: int(total or 0) for offer_id, total in rows}


def _cents(value: Decimal | None) -> Decimal | None:
    # As stored (2 places) even before the row is read back.
    return quantize(value) if value is not None else None


def _offers_out(session: Session, rows: Sequence[Offer]) -> list[OfferOut]:
    uses = _uses(session, [row.id for row in rows])
    return [
        OfferOut(
            id=row.id,
            name=row.name,
            description=row.description,
            status=row.status,
            priority=row.priority,
            summable=row.summable,
            starts_at=row.starts_at,
            ends_at=row.ends_at,
            chains=row.chains,
            max_uses_per_member=row.max_uses_per_member,
            budget_points=_cents(row.budget_points),
            budget_money=_cents(row.budget_money),
            spent_points=_cents(row.spent_points) or Decimal("0.00"),
            spent_money=_cents(row.spent_money) or Decimal("0.00"),
            uses=uses.get(row.id, 0),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for row in rows
    ]


def _offer_out(session: Session, row: Offer) -> OfferOut:
    return _offers_out(session, [row])[0]


def _audit_view(out: OfferOut) -> dict[str, Any]:
    return out.model_dump(
        mode="json", exclude={"spent_points", "spent_money", "uses", "created_at", "updated_at"}
    )


def _touch(offer: Offer, now: datetime) -> None:
    # Strictly later than before, so the snapshot's max(updated_at) fingerprint always moves.
    previous = offer.updated_at
    offer.updated_at = max(now, previous + timedelta(microseconds=1)) if previous else now


def create_offer(db: Database, data: OfferCreate, actor: Principal) -> OfferOut:
    with db.transaction() as session:
        check_chains(session, data.chains)
        now = utcnow()
        offer = Offer(
            name=data.name,
            description=data.description,
            status="draft",
            priority=data.priority,
            summable=data.summable,
            starts_at=data.starts_at,
            ends_at=data.ends_at,
            chains=[chain.stored() for chain in data.chains],
            max_uses_per_member=data.max_uses_per_member,
            budget_points=data.budget_points,
            budget_money=data.budget_money,
            spent_points=Decimal(0),
            spent_money=Decimal(0),
            created_at=now,
            updated_at=now,
        )
        session.add(offer)
        session.flush()
        session.add(
            OfferStatusChange(
                offer_id=offer.id, from_status=None, to_status="draft", at=now, actor=_actor_name(actor)
            )
        )
        out = _offer_out(session, offer)
        record_audit(session, actor, "create", "offer", offer.id, None, _audit_view(out))
        return out


def get_offer(db: Database, offer_id: int) -> OfferOut:
    with db.reading() as session:
        return _offer_out(session, _offer_row(session, offer_id))


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def list_offers(
    db: Database, limit: int, cursor: str | None, *, status: str | None = None, q: str | None = None
) -> Page[OfferOut]:
    with db.reading() as session:
        stmt = select(Offer)
        if status:
            stmt = stmt.where(Offer.status == status)
        if q and q.strip():
            text = q.strip()
            # SQLite's case folding is ASCII only: try the usual spellings as well.
            variants = {text, text.lower(), text.upper(), text.capitalize()}
            stmt = stmt.where(or_(*(Offer.name.ilike(_like(v), escape="\\") for v in variants)))
        stmt, limit = paginate(stmt, Offer.id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        return Page[OfferOut](items=_offers_out(session, rows), next_cursor=next_cursor)


_UPDATABLE = (
    "name",
    "description",
    "priority",
    "summable",
    "starts_at",
    "ends_at",
    "max_uses_per_member",
    "budget_points",
    "budget_money",
)


def update_offer(db: Database, offer_id: int, data: OfferUpdate, actor: Principal) -> OfferOut:
    with db.transaction() as session:
        offer = _offer_row(session, offer_id, lock=True)
        if offer.status not in EDITABLE:
            raise Conflict(
                "offer_not_editable", f"A {offer.status} offer can no longer be edited; create a new one"
            )
        given = data.model_fields_set
        starts_at = data.starts_at if "starts_at" in given else offer.starts_at
        ends_at = data.ends_at if "ends_at" in given else offer.ends_at
        if starts_at is not None and ends_at is not None and ends_at <= starts_at:
            field = "ends_at" if "ends_at" in given else "starts_at"
            raise AppError("invalid_period", "ends_at must be after starts_at", field=field, status_code=422)
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        current = _audit_view(_offer_out(session, offer))
        for name in _UPDATABLE:
            if name in given and getattr(offer, name) != getattr(data, name):
                setattr(offer, name, getattr(data, name))
                before[name] = current[name]
        if "chains" in given and data.chains is not None:
            check_chains(session, data.chains)
            chains = [chain.stored() for chain in data.chains]
            if chains != offer.chains:
                before["chains"] = offer.chains
                offer.chains = chains
        if not before:
            return _offer_out(session, offer)
        _touch(offer, utcnow())
        session.flush()
        out = _offer_out(session, offer)
        view = _audit_view(out)
        after = {name: view[name] for name in before}
        record_audit(session, actor, "update", "offer", offer.id, before, after)
        return out


def change_status(db: Database, offer_id: int, status: str, actor: Principal) -> OfferOut:
    with db.transaction() as session:
        offer = _offer_row(session, offer_id, lock=True)
        current = offer.status
        if status == current:
            return _offer_out(session, offer)
        if status not in TRANSITIONS[current]:
            allowed = ", ".join(sorted(TRANSITIONS[current])) or "none"
            raise Conflict(
                "invalid_status_transition",
                f"A {current} offer cannot become {status}; allowed: {allowed}",
                field="status",
            )
        if status == "active":
            check_chains(session, _stored_chains(offer))
        now = utcnow()
        offer.status = status
        _touch(offer, now)
        session.add(
            OfferStatusChange(
                offer_id=offer.id, from_status=current, to_status=status, at=now, actor=_actor_name(actor)
            )
        )
        session.flush()
        record_audit(session, actor, "status", "offer", offer.id, {"status": current}, {"status": status})
        return _offer_out(session, offer)


def offer_history(db: Database, offer_id: int, limit: int, cursor: str | None) -> Page[StatusChangeOut]:
    with db.reading() as session:
        _offer_row(session, offer_id)
        stmt = select(OfferStatusChange).where(OfferStatusChange.offer_id == offer_id)
        stmt, limit = paginate(stmt, OfferStatusChange.id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        return Page[StatusChangeOut](
            items=[StatusChangeOut.model_validate(r, from_attributes=True) for r in rows],
            next_cursor=next_cursor,
        )


def offer_ids_active_at(session: Session, moment: datetime) -> set[int]:
    """Offers whose status was ``active`` at ``moment`` (aware), from the status history.

    For cheques replayed later (offline tills): the offers that ran when the purchase happened,
    whatever their status now. The offer period (local wall clock) is the engine's business.
    """
    moment = ensure_utc(moment, field="moment")
    last = (
        select(
            OfferStatusChange.offer_id,
            OfferStatusChange.to_status,
            func.row_number()
            .over(
                partition_by=OfferStatusChange.offer_id,
                order_by=(OfferStatusChange.at.desc(), OfferStatusChange.id.desc()),
            )
            .label("rank"),
        )
        .where(OfferStatusChange.at <= moment)
        .subquery()
    )
    return set(session.scalars(select(last.c.offer_id).where(last.c.rank == 1, last.c.to_status == "active")))


# ---------------------------------------------------------------- target audiences


def _audience_row(session: Session, code: str, *, lock: bool = False) -> TargetAudience:
    stmt = select(TargetAudience).where(TargetAudience.code == code)
    if lock:
        stmt = stmt.with_for_update()
    audience = session.scalar(stmt)
    if audience is None:
        raise not_found("audience", code)
    return audience


def _member_count(session: Session, audience_id: int) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(TargetAudienceMember)
            .where(TargetAudienceMember.audience_id == audience_id)
        )
        or 0
    )


def _audience_out(audience: TargetAudience, count: int) -> AudienceOut:
    return AudienceOut(
        code=audience.code,
        name=audience.name,
        source=audience.source,
        member_count=count,
        created_at=audience.created_at,
        updated_at=audience.updated_at,
    )


def create_audience(db: Database, data: AudienceCreate, actor: Principal) -> AudienceOut:
    try:
        with db.transaction() as session:
            if session.scalar(select(TargetAudience.id).where(TargetAudience.code == data.code)) is not None:
                raise Conflict("duplicate_audience", f"Audience {data.code!r} already exists", field="code")
            now = utcnow()
            audience = TargetAudience(
                code=data.code, name=data.name, source="api", created_at=now, updated_at=now
            )
            session.add(audience)
            session.flush()
            out = _audience_out(audience, 0)
            record_audit(
                session, actor, "create", "target_audience", data.code, None, out.model_dump(mode="json")
            )
            return out
    except IntegrityError as exc:  # created by someone else meanwhile
        raise Conflict("duplicate_audience", f"Audience {data.code!r} already exists", field="code") from exc


def get_audience(db: Database, code: str) -> AudienceOut:
    with db.reading() as session:
        audience = _audience_row(session, code)
        return _audience_out(audience, _member_count(session, audience.id))


def list_audiences(db: Database, limit: int, cursor: str | None) -> Page[AudienceOut]:
    with db.reading() as session:
        stmt, limit = paginate(select(TargetAudience), TargetAudience.id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        counts: dict[int, int] = {}
        if rows:
            counts = {
                audience_id: int(n)
                for audience_id, n in session.execute(
                    select(TargetAudienceMember.audience_id, func.count())
                    .where(TargetAudienceMember.audience_id.in_([r.id for r in rows]))
                    .group_by(TargetAudienceMember.audience_id)
                )
            }
        return Page[AudienceOut](
            items=[_audience_out(r, counts.get(r.id, 0)) for r in rows], next_cursor=next_cursor
        )


def _check_members(session: Session, ids: Sequence[int]) -> None:
    """Refuses ids that are no member (``unknown_member`` naming the first few)."""
    found: set[int] = set()
    for part in _chunks(ids):
        found.update(session.scalars(select(Member.id).where(Member.id.in_(part))))
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise NotFound(
            "unknown_member",
            f"{len(unknown)} member id(s) unknown, e.g. {', '.join(map(str, unknown[:10]))}",
            field="member_ids",
            details={"member_ids": unknown[:10], "unknown_count": len(unknown)},
        )


def _present(session: Session, audience_id: int, ids: Sequence[int]) -> set[int]:
    present: set[int] = set()
    for part in _chunks(ids):
        present.update(
            session.scalars(
                select(TargetAudienceMember.member_id).where(
                    TargetAudienceMember.audience_id == audience_id, TargetAudienceMember.member_id.in_(part)
                )
            )
        )
    return present


def _insert(session: Session, audience_id: int, ids: Sequence[int], now: datetime) -> None:
    for part in _chunks(ids):
        # One multi-row INSERT per chunk: no ORM object per member.
        session.execute(
            insert(TargetAudienceMember),
            [{"audience_id": audience_id, "member_id": i, "added_at": now} for i in part],
        )


def _delete(session: Session, audience_id: int, ids: Sequence[int]) -> int:
    removed = 0
    for part in _chunks(ids):
        result = session.execute(
            delete(TargetAudienceMember).where(
                TargetAudienceMember.audience_id == audience_id, TargetAudienceMember.member_id.in_(part)
            ),
            execution_options={"synchronize_session": False},
        )
        removed += int(getattr(result, "rowcount", 0) or 0)
    return removed


def _source(source: str) -> str:
    if source not in {"api", "segment"}:
        raise ValueError(f"audience source must be api or segment, not {source!r}")
    return source


def _changed(
    session: Session, audience: TargetAudience, source: str, added: int, removed: int
) -> AudienceMembersResult:
    if added or removed or audience.source != source:
        audience.source = source
        audience.updated_at = utcnow()
    session.flush()
    if added or removed:
        emit(
            session,
            f"target_audience.changed:{audience.id}:{uuid4().hex}",
            "target_audience.changed",
            occurred_at=audience.updated_at,
            properties={"audience": audience.id, "code": audience.code, "added": added, "removed": removed},
        )
    return AudienceMembersResult(
        code=audience.code, added=added, removed=removed, member_count=_member_count(session, audience.id)
    )


def add_audience_members(
    session: Session, code: str, member_ids: Iterable[int], *, source: str = "segment"
) -> AudienceMembersResult:
    """Adds members (those already in stay as they are); in the caller's transaction."""
    audience = _audience_row(session, code, lock=True)
    ids = list(dict.fromkeys(member_ids))
    present = _present(session, audience.id, ids)
    new = [i for i in ids if i not in present]
    _check_members(session, new)
    _insert(session, audience.id, new, utcnow())
    return _changed(session, audience, _source(source), len(new), 0)


def remove_audience_members(
    session: Session, code: str, member_ids: Iterable[int], *, source: str = "segment"
) -> AudienceMembersResult:
    """Removes members (ids not in the audience are ignored, unknown ids refused)."""
    audience = _audience_row(session, code, lock=True)
    ids = list(dict.fromkeys(member_ids))
    present = _present(session, audience.id, ids)
    _check_members(session, [i for i in ids if i not in present])
    removed = _delete(session, audience.id, sorted(present))
    return _changed(session, audience, _source(source), 0, removed)


def replace_audience_members(
    session: Session, code: str, member_ids: Iterable[int], *, source: str = "segment"
) -> AudienceMembersResult:
    """Makes the audience exactly ``member_ids``: only the difference is written."""
    audience = _audience_row(session, code, lock=True)
    wanted = list(dict.fromkeys(member_ids))
    current = set(
        session.scalars(
            select(TargetAudienceMember.member_id).where(TargetAudienceMember.audience_id == audience.id)
        )
    )
    new = [i for i in wanted if i not in current]
    _check_members(session, new)
    gone = sorted(current.difference(wanted))
    removed = _delete(session, audience.id, gone)
    _insert(session, audience.id, new, utcnow())
    return _changed(session, audience, _source(source), len(new), removed)


_MEMBER_CHANGES = {
    "add": add_audience_members,
    "remove": remove_audience_members,
    "replace": replace_audience_members,
}


def change_audience_members(
    db: Database, code: str, data: AudienceMembersIn, actor: Principal
) -> AudienceMembersResult:
    with db.transaction() as session:
        before = _member_count(session, _audience_row(session, code).id)
        result = _MEMBER_CHANGES[data.mode](session, code, data.member_ids, source="api")
        # Counts, not ids: an audience may hold millions of members.
        record_audit(
            session,
            actor,
            f"members_{data.mode}",
            "target_audience",
            code,
            {"member_count": before},
            {
                "mode": data.mode,
                "given": len(data.member_ids),
                "added": result.added,
                "removed": result.removed,
                "member_count": result.member_count,
            },
        )
        return result


def list_audience_members(db: Database, code: str, limit: int, cursor: str | None) -> Page[AudienceMemberOut]:
    with db.reading() as session:
        audience = _audience_row(session, code)
        stmt = select(TargetAudienceMember).where(TargetAudienceMember.audience_id == audience.id)
        stmt, limit = paginate(stmt, TargetAudienceMember.member_id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit, lambda r: r.member_id)
        return Page[AudienceMemberOut](
            items=[AudienceMemberOut(member_id=r.member_id, added_at=r.added_at) for r in rows],
            next_cursor=next_cursor,
        )


def offers_using_audience(session: Session, code: str, statuses: Sequence[str] = LIVE) -> list[int]:
    """Ids of offers in ``statuses`` with an ``audience`` filter naming ``code``."""
    rows = session.execute(
        select(Offer.id, Offer.chains).where(Offer.status.in_(statuses)).order_by(Offer.id)
    )
    return [
        offer_id
        for offer_id, chains in rows
        if any(
            rule.get("type") == "audience" and code in rule.get("audiences", ())
            for chain in chains or ()
            for rule in chain.get("filters", ())
        )
    ]


def delete_audience(db: Database, code: str, actor: Principal) -> None:
    with db.transaction() as session:
        audience = _audience_row(session, code, lock=True)
        users = offers_using_audience(session, code)
        if users:
            raise Conflict(
                "audience_in_use",
                f"Offers {', '.join(map(str, users))} filter on audience {code!r}: pause is not enough, "
                "finish them or change their filters first",
                details={"offer_ids": users},
            )
        before = _audience_out(audience, _member_count(session, audience.id)).model_dump(mode="json")
        session.execute(
            delete(TargetAudienceMember).where(TargetAudienceMember.audience_id == audience.id),
            execution_options={"synchronize_session": False},
        )
        session.delete(audience)
        record_audit(session, actor, "delete", "target_audience", code, before, None)
