"""Member and card use cases: registration, profile changes, consents, the card life cycle.

Card life cycle: ``prepared → issued → activated``; an activated card may be blocked
(lost, damaged, other) and unblocked; a blocked physical card is replaced by a new one,
which becomes activated for the same member while the old one becomes ``replaced``.
Balances belong to the member, so a replacement moves no points.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import uuid4

from sqlalchemy import ColumnElement, bindparam, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omniloyal.auth.schemas import Principal
from omniloyal.auth.service import record_audit
from omniloyal.db.engine import Database
from omniloyal.events.outbox import emit, emit_many, envelope
from omniloyal.kernel.clock import ensure_utc, utcnow
from omniloyal.kernel.errors import AppError, Conflict, NotFound, not_found
from omniloyal.kernel.pagination import Page, cut, paginate
from omniloyal.members import quality
from omniloyal.members.merge import resolve
from omniloyal.members.models import CONSENT_CHANNELS, AttributeDefinition, Card, Member, MemberConsent
from omniloyal.members.normalize import normalize_email, normalize_phone
from omniloyal.members.schemas import (
    AttributeConstraints,
    AttributeDefinitionCreate,
    AttributeDefinitionOut,
    AttributeDefinitionUpdate,
    CardBatchCreate,
    CardBlock,
    CardLink,
    CardOut,
    CardReplacement,
    ConsentOut,
    ConsentsIn,
    ConsentsOut,
    ConsentValue,
    MemberCreate,
    MemberOut,
    MemberUpdate,
    normalize_card_number,
)

DEFAULT_CONSENT_SOURCE = "admin_api"
_STATE_ORDER = {"prepared": 0, "issued": 1, "activated": 2}


# ---------------------------------------------------------------- output


def _card_snapshot(card: Card, replaced_by: str | None = None) -> dict[str, Any]:
    return {
        "number": card.number,
        "member_id": card.member_id,
        "kind": card.kind,
        "state": card.state,
        "blocked": card.blocked,
        "block_reason": card.block_reason,
        "block_comment": card.block_comment,
        "blocked_at": card.blocked_at,
        "replaced_by": replaced_by,
        "issued_at": card.issued_at,
        "activated_at": card.activated_at,
        "created_at": card.created_at,
    }


def _cards_out(session: Session, cards: Iterable[Card]) -> list[CardOut]:
    cards = list(cards)
    successor_ids = {c.replaced_by_id for c in cards if c.replaced_by_id is not None}
    numbers: dict[int, str] = {}
    if successor_ids:
        rows = session.execute(select(Card.id, Card.number).where(Card.id.in_(successor_ids))).all()
        numbers = {card_id: number for card_id, number in rows}
    return [
        CardOut(**_card_snapshot(c, numbers.get(c.replaced_by_id) if c.replaced_by_id else None))
        for c in cards
    ]


def _card_out(session: Session, card: Card) -> CardOut:
    return _cards_out(session, [card])[0]


def _consents_out(rows: Iterable[MemberConsent]) -> ConsentsOut:
    by_channel = {r.channel: r for r in rows}
    values: dict[str, ConsentOut] = {}
    for channel in CONSENT_CHANNELS:
        row = by_channel.get(channel)
        values[channel] = (
            ConsentOut(granted=row.granted, changed_at=row.changed_at, source=row.source)
            if row is not None
            else ConsentOut(granted=False, changed_at=None, source=None)
        )
    return ConsentsOut(**values)


def _members_out(session: Session, members: list[Member]) -> list[MemberOut]:
    ids = [m.id for m in members]
    cards: dict[int, list[CardOut]] = {i: [] for i in ids}
    consents: dict[int, list[MemberConsent]] = {i: [] for i in ids}
    if ids:
        stmt = select(Card).where(Card.member_id.in_(ids)).order_by(Card.id)
        for card in _cards_out(session, session.scalars(stmt)):
            cards[card.member_id or 0].append(card)
        for consent in session.scalars(select(MemberConsent).where(MemberConsent.member_id.in_(ids))):
            consents[consent.member_id].append(consent)
    return [
        MemberOut(
            id=m.id,
            external_id=m.external_id,
            status=m.status,
            first_name=m.first_name,
            last_name=m.last_name,
            middle_name=m.middle_name,
            gender=m.gender,
            birth_date=m.birth_date,
            phone=m.phone,
            email=m.email,
            address=m.address,
            city=m.city,
            timezone=m.timezone,
            children=m.children or [],
            pets=m.pets or [],
            preferred_categories=m.preferred_categories or [],
            attributes=m.attributes or {},
            consents=_consents_out(consents[m.id]),
            cards=cards[m.id],
            registered_at=m.registered_at,
            created_at=m.created_at,
            updated_at=m.updated_at,
        )
        for m in members
    ]


def _member_out(session: Session, member: Member) -> MemberOut:
    return _members_out(session, [member])[0]


# ---------------------------------------------------------------- races the checks cannot see

# A concurrent writer (PostgreSQL) can slip past a pre-check; the unique constraints then
# refuse the row. SQLite names columns, PostgreSQL names constraints: both are matched.
_UNIQUE_VIOLATIONS = (
    (("uq_members_phone", "members.phone"), "phone"),
    (("uq_members_email", "members.email"), "email"),
    (("uq_members_external_id", "members.external_id"), "external_id"),
    (("uq_cards_number", "cards.number"), "number"),
)


@contextmanager
def _unique_violations(session: Session, card_field: str = "number") -> Iterator[None]:
    try:
        yield
        session.flush()
    except IntegrityError as exc:
        text = str(exc.orig)
        if "uq_cards_member_kind_activated" in text or "cards.member_id, cards.kind" in text:
            raise Conflict(
                "card_limit_reached", "The member already has an activated card of this kind", field="state"
            ) from exc
        for markers, field in _UNIQUE_VIOLATIONS:
            if any(m in text for m in markers):
                raise Conflict(
                    "duplicate_identifier",
                    f"Another member already uses this {field}",
                    field=card_field if field == "number" else field,
                ) from exc
        raise


def _flush(session: Session, card_field: str = "number") -> None:
    with _unique_violations(session, card_field):
        pass


# ---------------------------------------------------------------- events (outbox, same transaction)


def _questionnaire(session: Session, member: Member) -> dict[str, Any]:
    """The member as ``member.registered`` / ``member.updated`` carry it (docs/events.md)."""
    consents = session.scalars(select(MemberConsent).where(MemberConsent.member_id == member.id))
    return _questionnaire_values(member, {c.channel: _consent_view(c) for c in consents})


def _consent_view(consent: MemberConsent) -> dict[str, Any]:
    return {"granted": consent.granted, "at": consent.changed_at.isoformat(), "source": consent.source}


def _questionnaire_values(member: Member, consents: dict[str, Any]) -> dict[str, Any]:
    return {
        "first_name": member.first_name,
        "last_name": member.last_name,
        "middle_name": member.middle_name,
        "gender": member.gender,
        "birth_date": member.birth_date.isoformat() if member.birth_date else None,
        "city": member.city,
        "phone": member.phone,
        "email": member.email,
        "children": list(member.children or []),
        "pets": list(member.pets or []),
        "preferred_categories": list(member.preferred_categories or []),
        "attributes": dict(member.attributes or {}),
        "consents": consents,
        "created_at": member.created_at.isoformat(),
    }


def _card_event(session: Session, card: Card, event_type: str, **properties: Any) -> None:
    # Blocking and unblocking can repeat: those ids get a unique suffix.
    suffix = f":{uuid4().hex}" if event_type in ("card.blocked", "card.unblocked") else ""
    emit(
        session,
        f"{event_type}:{card.id}{suffix}",
        event_type,
        member_id=card.member_id,
        properties={"card": card.number, "kind": card.kind, **properties},
    )


# ---------------------------------------------------------------- identifiers


def _contacts(
    phone: str | None, email: str | None, region: str, prefix: str = ""
) -> tuple[str | None, str | None]:
    return (
        normalize_phone(phone, region, field=prefix + "phone") if phone else None,
        normalize_email(email, field=prefix + "email") if email else None,
    )


def _check_identifiers_free(
    session: Session, member_id: int | None, identifiers: dict[str, str | None]
) -> None:
    columns = {"phone": Member.phone, "email": Member.email, "external_id": Member.external_id}
    for field, value in identifiers.items():
        if value is None:
            continue
        stmt = select(Member.id).where(columns[field] == value)
        if member_id is not None:
            stmt = stmt.where(Member.id != member_id)
        if session.scalar(stmt.limit(1)) is not None:
            raise Conflict("duplicate_identifier", f"Another member already has this {field}", field=field)


def _single_identifier(**identifiers: str | None) -> tuple[str, str]:
    given = [(k, v.strip()) for k, v in identifiers.items() if v is not None and v.strip()]
    if not given:
        raise AppError(
            "identifier_required", "Give one identifier: card, phone, email or external_id", field=None
        )
    if len(given) > 1:
        raise AppError(
            "too_many_identifiers",
            "Give exactly one identifier, not " + ", ".join(k for k, _ in given),
            field=given[1][0],
        )
    return given[0]


def find_member_id(
    session: Session,
    *,
    card: str | None = None,
    phone: str | None = None,
    email: str | None = None,
    external_id: str | None = None,
    region: str = "RU",
) -> int | None:
    """The member with exactly one identifier, normalised first; None when nobody has it.

    Malformed identifiers raise ``invalid_phone``/``invalid_email``/``invalid_card_number``.
    """
    kind, value = _single_identifier(card=card, phone=phone, email=email, external_id=external_id)
    if kind == "card":
        number = normalize_card_number(value)
        if number is None:
            raise AppError("invalid_card_number", f"{value!r} is not a card number", field="card")
        return session.scalar(select(Card.member_id).where(Card.number == number))
    if kind == "phone":
        condition = Member.phone == normalize_phone(value, region)
    elif kind == "email":
        condition = Member.email == normalize_email(value)
    else:
        condition = Member.external_id == value
    row = session.execute(select(Member.id, Member.merged_into_id).where(condition)).first()
    if row is None:
        return None
    # A merged duplicate keeps its contacts for the record; the member it became answers for them.
    return row[0] if row[1] is None else resolve(session, row[0])


# Prebuilt: building the expression costs more than running it, and tills ask on every cheque.
_CARD_BY_NUMBER = select(Card).where(Card.number == bindparam("number"))


def card_for_processing(session: Session, number: str) -> Card:
    """The card presented at a till: ``unknown_card`` (404) or ``card_blocked`` (409) otherwise."""
    normalized = normalize_card_number(number)
    card = session.scalar(_CARD_BY_NUMBER, {"number": normalized}) if normalized else None
    if card is None:
        raise not_found("card", number, field="card")
    if card.blocked:
        raise Conflict("card_blocked", f"Card {card.number} is blocked", field="card")
    return card


# ---------------------------------------------------------------- custom attributes


def _invalid(field: str, message: str) -> AppError:
    return AppError("invalid_attribute", message, field=field)


def _as_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool | float):
        return None
    try:
        result = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        return None
    return result if result.is_finite() else None


def _in_range(definition: AttributeDefinition, number: Decimal, field: str) -> None:
    limits = definition.constraints or {}
    if limits.get("min") is not None and number < Decimal(str(limits["min"])):
        raise _invalid(field, f"{definition.code} must be at least {limits['min']}")
    if limits.get("max") is not None and number > Decimal(str(limits["max"])):
        raise _invalid(field, f"{definition.code} must be at most {limits['max']}")


def _attribute_value(definition: AttributeDefinition, value: Any, field: str) -> Any:
    """The value as stored (JSON): checked against the definition's type and constraints."""
    kind = definition.type
    limits = definition.constraints or {}
    if kind == "string":
        if not isinstance(value, str):
            raise _invalid(field, f"{definition.code} is a string")
        if limits.get("max_length") is not None and len(value) > int(limits["max_length"]):
            raise _invalid(field, f"{definition.code} is at most {limits['max_length']} characters")
        if limits.get("pattern") and re.fullmatch(limits["pattern"], value) is None:
            raise _invalid(field, f"{definition.code} does not match {limits['pattern']!r}")
        return value
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid(field, f"{definition.code} is a whole number")
        _in_range(definition, Decimal(value), field)
        return value
    if kind == "decimal":
        number = _as_decimal(value)
        if number is None:
            raise _invalid(field, f'{definition.code} is a decimal string such as "10.50"')
        _in_range(definition, number, field)
        return format(number, "f")
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _invalid(field, f"{definition.code} is true or false")
        return value
    if kind == "date":
        try:
            return date.fromisoformat(value).isoformat()
        except (TypeError, ValueError) as exc:
            raise _invalid(field, f"{definition.code} is a date, YYYY-MM-DD") from exc
    if kind == "datetime":
        try:
            moment = datetime.fromisoformat(value)
        except (TypeError, ValueError) as exc:
            raise _invalid(field, f"{definition.code} is an ISO 8601 time with offset") from exc
        if moment.utcoffset() is None:
            raise _invalid(field, f"{definition.code} must carry a UTC offset")
        return ensure_utc(moment, field=field).isoformat()
    # enum
    if not isinstance(value, str) or value not in (definition.choices or []):
        raise _invalid(field, f"{definition.code} is one of {', '.join(definition.choices or [])}")
    return value


def _validated_attributes(
    session: Session, changes: dict[str, Any], current: dict[str, Any], *, creating: bool
) -> dict[str, Any]:
    """``current`` with ``changes`` merged (``None`` removes one), every value checked."""
    definitions = {d.code: d for d in session.scalars(select(AttributeDefinition))}
    result = dict(current)
    for code, value in changes.items():
        field = f"attributes.{code}"
        definition = definitions.get(code)
        if definition is None:
            raise AppError("unknown_attribute", f"No custom attribute {code!r} is defined", field=field)
        if value is None:
            result.pop(code, None)
        else:
            result[code] = _attribute_value(definition, value, field)
    for definition in definitions.values():
        # On update only a removal is refused: members older than the rule keep working.
        if (
            definition.required
            and result.get(definition.code) is None
            and (creating or definition.code in changes)
        ):
            raise AppError(
                "missing_attribute",
                f"The custom attribute {definition.code!r} is required",
                field=f"attributes.{definition.code}",
            )
    return result


# ---------------------------------------------------------------- cards inside a session


def _card_by_number(session: Session, number: str, *, lock: bool = False, field: str | None = None) -> Card:
    normalized = normalize_card_number(number)
    stmt = select(Card).where(Card.number == normalized)
    card = session.scalar(stmt.with_for_update() if lock else stmt) if normalized else None
    if card is None:
        raise not_found("card", number, field=field)
    return card


def _check_card_limit(session: Session, card: Card, field: str) -> None:
    other = session.scalar(
        select(Card.number).where(
            Card.member_id == card.member_id,
            Card.kind == card.kind,
            Card.state == "activated",
            Card.id != card.id,
        )
    )
    if other is not None:
        raise Conflict(
            "card_limit_reached",
            f"The member already has an activated {card.kind} card ({other}); block and replace it instead",
            field=field,
        )


def _move_card(session: Session, card: Card, target: str, field: str) -> None:
    """Forward along prepared → issued → activated; a state already reached is left alone."""
    current = _STATE_ORDER.get(card.state)
    if current is None or _STATE_ORDER[target] < current:
        raise Conflict(
            "invalid_card_state",
            f"Card {card.number} is {card.state}; it cannot become {target}",
            field=field,
        )
    now = utcnow()
    if target in ("issued", "activated") and card.issued_at is None:
        card.issued_at = now
    if target == "activated" and card.state != "activated":
        if card.member_id is None:
            raise Conflict(
                "card_unassigned", f"Card {card.number} has no member: link it to one first", field=field
            )
        _check_card_limit(session, card, field)
        card.activated_at = now
        card.state = target
        card.updated_at = now
        _card_event(session, card, "card.activated")
        return
    card.state = target
    card.updated_at = now


def _attach_card(session: Session, member: Member, link: CardLink, prefix: str) -> Card:
    """Links an unassigned card to the member, or creates it; then moves it to the state asked."""
    card = session.scalar(select(Card).where(Card.number == link.number).with_for_update())
    now = utcnow()
    if card is None:
        card = Card(
            number=link.number,
            member_id=member.id,
            kind=link.kind or "physical",
            state="prepared",
            blocked=False,
            created_at=now,
            updated_at=now,
        )
        session.add(card)
        session.flush()
    else:
        if card.member_id is not None:
            whose = "this member" if card.member_id == member.id else "another member"
            raise Conflict(
                "duplicate_identifier",
                f"Card {card.number} already belongs to {whose}",
                field=prefix + "number",
            )
        if link.kind is not None and link.kind != card.kind:
            raise Conflict(
                "card_kind_mismatch", f"Card {card.number} is a {card.kind} card", field=prefix + "kind"
            )
        if card.state not in ("prepared", "issued"):
            raise Conflict(
                "invalid_card_state", f"Card {card.number} is {card.state}", field=prefix + "number"
            )
        card.member_id = member.id
        card.updated_at = now
    if link.state is not None:
        _move_card(session, card, link.state, prefix + "state")
    return card


# ---------------------------------------------------------------- members


def _consent_parts(value: ConsentValue) -> tuple[bool, str]:
    if isinstance(value, bool):
        return value, DEFAULT_CONSENT_SOURCE
    return value.granted, value.source or DEFAULT_CONSENT_SOURCE


def create_member_in(session: Session, data: MemberCreate, region: str) -> Member:
    """Registers a member with cards and consents in the caller's transaction (no audit)."""
    phone, email = _contacts(data.phone, data.email, region)
    _check_identifiers_free(session, None, {"phone": phone, "email": email, "external_id": data.external_id})
    seen: set[str] = set()
    for i, link in enumerate(data.cards):
        if link.number in seen:
            raise Conflict(
                "duplicate_identifier", f"Card {link.number} is given twice", field=f"cards.{i}.number"
            )
        seen.add(link.number)
        owner = session.scalar(select(Card.member_id).where(Card.number == link.number))
        if owner is not None:
            raise Conflict(
                "duplicate_identifier",
                f"Card {link.number} already belongs to another member",
                field=f"cards.{i}.number",
            )
    attributes = _validated_attributes(session, data.attributes or {}, {}, creating=True)
    now = utcnow()
    member = Member(
        external_id=data.external_id,
        status="active",
        first_name=data.first_name,
        last_name=data.last_name,
        middle_name=data.middle_name,
        gender=data.gender,
        birth_date=data.birth_date,
        phone=phone,
        email=email,
        address=data.address,
        city=data.city,
        timezone=data.timezone,
        children=[c.model_dump(mode="json") for c in data.children or []],
        pets=list(data.pets or []),
        preferred_categories=list(data.preferred_categories or []),
        attributes=attributes,
        registered_at=ensure_utc(data.registered_at, field="registered_at") if data.registered_at else now,
        created_at=now,
        updated_at=now,
    )
    session.add(member)
    session.flush()
    for i, link in enumerate(data.cards):
        _attach_card(session, member, link, f"cards.{i}.")
    if data.consents is not None:
        for channel in CONSENT_CHANNELS:
            value = getattr(data.consents, channel)
            if value is not None:
                granted, source = _consent_parts(value)
                session.add(
                    MemberConsent(
                        member_id=member.id, channel=channel, granted=granted, changed_at=now, source=source
                    )
                )
    emit(
        session,
        f"member.registered:{member.id}",
        "member.registered",
        member_id=member.id,
        occurred_at=member.registered_at,
        properties={"member": _questionnaire(session, member)},
    )
    quality.refresh(session, [member.id], region)
    return member


def create_member(db: Database, data: MemberCreate, actor: Principal, region: str = "RU") -> MemberOut:
    with db.transaction() as session:
        with _unique_violations(session, card_field="cards"):
            member = create_member_in(session, data, region)
        created = _member_out(session, member)
        record_audit(session, actor, "create", "member", member.id, None, created.model_dump(mode="json"))
        return created


def _member(session: Session, member_id: int, *, lock: bool = False) -> Member:
    stmt = select(Member).where(Member.id == member_id)
    member = session.scalar(stmt.with_for_update() if lock else stmt)
    if member is None:
        raise not_found("member", member_id)
    return member


@dataclass(frozen=True, slots=True)
class ContactFacts:
    """What segments mirror of a member from the operational store (``contact_facts``)."""

    member_id: int
    status: str
    phone: str | None
    email: str | None
    # (number, state, blocked) of every card the member holds.
    cards: tuple[tuple[str, str, bool], ...]


_CONTACTS = select(Member.id, Member.status, Member.phone, Member.email).where(
    Member.id.in_(bindparam("ids", expanding=True))
)
_CARDS_OF = (
    select(Card.member_id, Card.number, Card.state, Card.blocked)
    .where(Card.member_id.in_(bindparam("ids", expanding=True)))
    .order_by(Card.id)
)


def contact_facts(db: Database, member_ids: Iterable[int]) -> dict[int, ContactFacts]:
    """Status, contacts and cards of many members: two statements per 500, no ORM objects
    (the warehouse mirror reads this for every member a batch of events touched). Unknown ids
    are absent."""
    ids = sorted(set(member_ids))
    result: dict[int, ContactFacts] = {}
    with db.reading() as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            cards: dict[int, list[tuple[str, str, bool]]] = {}
            for holder, number, state, blocked in session.execute(_CARDS_OF, {"ids": chunk}):
                cards.setdefault(holder or 0, []).append((number, state, bool(blocked)))
            for member_id, status, phone, email in session.execute(_CONTACTS, {"ids": chunk}):
                owned = tuple(cards.get(member_id, ()))
                result[member_id] = ContactFacts(member_id, status, phone, email, owned)
    return result


def get_member(db: Database, member_id: int) -> MemberOut:
    with db.reading() as session:
        return _member_out(session, _member(session, member_id))


def update_member(
    db: Database, member_id: int, data: MemberUpdate, actor: Principal, region: str = "RU"
) -> MemberOut:
    with db.transaction() as session:
        member = _member(session, member_id, lock=True)
        values: dict[str, Any] = {}
        for name in data.model_fields_set:
            value = getattr(data, name)
            if name == "phone":
                value = _contacts(value, None, region)[0]
            elif name == "email":
                value = _contacts(None, value, region)[1]
            elif name == "children":
                value = [c.model_dump(mode="json") for c in value or []]
            elif name in ("pets", "preferred_categories"):
                value = list(value or [])
            elif name == "attributes":
                value = _validated_attributes(session, value or {}, member.attributes or {}, creating=False)
            values[name] = value
        _check_identifiers_free(
            session, member.id, {k: v for k, v in values.items() if k in ("phone", "email", "external_id")}
        )
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        for name, value in values.items():
            old = getattr(member, name)
            if old != value:
                before[name], after[name] = old, value
                setattr(member, name, value)
        if after:
            member.updated_at = utcnow()
            _flush(session)
            record_audit(session, actor, "update", "member", member.id, before, after)
            quality.refresh(session, [member.id], region)
            emit(
                session,
                f"member.updated:{member.id}:{uuid4().hex}",
                "member.updated",
                member_id=member.id,
                occurred_at=member.updated_at,
                properties={"member": _questionnaire(session, member), "changed": sorted(after)},
            )
        return _member_out(session, member)


def _name_matches(q: str) -> ColumnElement[bool]:
    # LIKE folds case only for ASCII on SQLite (and under the C collation on PostgreSQL), so the
    # usual spellings of a Cyrillic name are tried as well: "иван" finds "Иван".
    variants = {q, q.lower(), q.upper(), q.capitalize()}
    columns = (Member.first_name, Member.last_name, Member.middle_name)
    escaped = [v.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for v in variants]
    return or_(*(c.ilike(f"%{v}%", escape="\\") for c in columns for v in escaped))


def list_members(
    db: Database, limit: int, cursor: str | None, *, city: str | None = None, q: str | None = None
) -> Page[MemberOut]:
    with db.reading() as session:
        stmt = select(Member)
        if city:
            stmt = stmt.where(Member.city == city.strip())
        if q and q.strip():
            stmt = stmt.where(_name_matches(q.strip()))
        stmt, limit = paginate(stmt, Member.id, limit, cursor)
        page, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        return Page[MemberOut](items=_members_out(session, page), next_cursor=next_cursor)


def lookup_member(
    db: Database,
    *,
    card: str | None = None,
    phone: str | None = None,
    email: str | None = None,
    external_id: str | None = None,
    region: str = "RU",
) -> MemberOut:
    with db.reading() as session:
        member_id = find_member_id(
            session, card=card, phone=phone, email=email, external_id=external_id, region=region
        )
        if member_id is None:
            given = next(v for v in (card, phone, email, external_id) if v is not None and v.strip())
            raise NotFound("unknown_member", f"No member with {given!r}")
        return _member_out(session, _member(session, member_id))


# ---------------------------------------------------------------- consents


def get_consents(db: Database, member_id: int) -> ConsentsOut:
    with db.reading() as session:
        _member(session, member_id)
        return _consents_out(
            session.scalars(select(MemberConsent).where(MemberConsent.member_id == member_id))
        )


def _consent_json(row: MemberConsent) -> dict[str, Any]:
    # Written as the API shows it, so an audit record compares equal to a GET.
    return ConsentOut(granted=row.granted, changed_at=row.changed_at, source=row.source).model_dump(
        mode="json"
    )


def set_consents(db: Database, member_id: int, data: ConsentsIn, actor: Principal) -> ConsentsOut:
    """Changes the channels given; a channel whose answer is unchanged keeps its date and source."""
    with db.transaction() as session:
        _member(session, member_id, lock=True)
        rows = {
            r.channel: r
            for r in session.scalars(select(MemberConsent).where(MemberConsent.member_id == member_id))
        }
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        now = utcnow()
        for channel in CONSENT_CHANNELS:
            value = getattr(data, channel)
            if value is None:
                continue
            granted, source = _consent_parts(value)
            row = rows.get(channel)
            if row is not None and row.granted == granted:
                continue
            before[channel] = _consent_json(row) if row is not None else None
            if row is None:
                row = MemberConsent(member_id=member_id, channel=channel)
                session.add(row)
                rows[channel] = row
            row.granted, row.changed_at, row.source = granted, now, source
            after[channel] = _consent_json(row)
            emit(
                session,
                f"consent.changed:{member_id}:{channel}:{uuid4().hex}",
                "consent.changed",
                member_id=member_id,
                occurred_at=now,
                properties={"channel": channel, "granted": granted, "source": source},
            )
        if after:
            record_audit(session, actor, "consents", "member", member_id, before, after)
        return _consents_out(rows.values())


# ---------------------------------------------------------------- cards


def create_cards(db: Database, data: CardBatchCreate, actor: Principal) -> list[CardOut]:
    """Prepared cards without a member (printed in advance, handed out in stores)."""
    with db.transaction() as session:
        seen: set[str] = set()
        for i, number in enumerate(data.numbers):
            if number in seen:
                raise Conflict("duplicate_identifier", f"Card {number} is given twice", field=f"numbers.{i}")
            seen.add(number)
        existing = set(session.scalars(select(Card.number).where(Card.number.in_(seen))))
        if existing:
            i = next(i for i, n in enumerate(data.numbers) if n in existing)
            raise Conflict(
                "duplicate_identifier", f"Card {data.numbers[i]} already exists", field=f"numbers.{i}"
            )
        now = utcnow()
        cards = [
            Card(number=n, kind=data.kind, state="prepared", blocked=False, created_at=now, updated_at=now)
            for n in data.numbers
        ]
        with _unique_violations(session, card_field="numbers"):
            session.add_all(cards)
        out = _cards_out(session, cards)
        for card in out:
            record_audit(session, actor, "create", "card", card.number, None, card.model_dump(mode="json"))
        return out


def get_card(db: Database, number: str) -> CardOut:
    with db.reading() as session:
        return _card_out(session, _card_by_number(session, number))


def link_card(db: Database, member_id: int, link: CardLink, actor: Principal) -> CardOut:
    """Gives the member a card: an unassigned one is linked, an unknown number is created."""
    with db.transaction() as session:
        member = _member(session, member_id)
        existing = session.scalar(select(Card).where(Card.number == link.number))
        before = _card_out(session, existing).model_dump(mode="json") if existing is not None else None
        with _unique_violations(session):
            card = _attach_card(session, member, link, "")
        out = _card_out(session, card)
        record_audit(session, actor, "link", "card", card.number, before, out.model_dump(mode="json"))
        return out


def _change_card(
    db: Database, number: str, actor: Principal, action: str, change: Callable[[Session, Card], None]
) -> CardOut:
    with db.transaction() as session:
        card = _card_by_number(session, number, lock=True)
        before = _card_out(session, card).model_dump(mode="json")
        # Two cards of one member activated at once: the partial unique index refuses the second.
        with _unique_violations(session):
            change(session, card)
        out = _card_out(session, card)
        record_audit(session, actor, action, "card", card.number, before, out.model_dump(mode="json"))
        return out


def issue_card(db: Database, number: str, actor: Principal) -> CardOut:
    def issue(session: Session, card: Card) -> None:
        if card.state != "prepared":
            raise Conflict(
                "invalid_card_state", f"Only a prepared card can be issued; {card.number} is {card.state}"
            )
        _move_card(session, card, "issued", "state")

    return _change_card(db, number, actor, "issue", issue)


def activate_card(db: Database, number: str, actor: Principal) -> CardOut:
    def activate(session: Session, card: Card) -> None:
        if card.state not in ("prepared", "issued"):
            raise Conflict(
                "invalid_card_state", f"Card {card.number} is {card.state}; it cannot be activated"
            )
        _move_card(session, card, "activated", "state")

    return _change_card(db, number, actor, "activate", activate)


def block_card(db: Database, number: str, data: CardBlock, actor: Principal) -> CardOut:
    def block(session: Session, card: Card) -> None:
        if card.state != "activated":
            raise Conflict(
                "card_not_active", f"Only an activated card can be blocked; {card.number} is {card.state}"
            )
        if card.blocked:
            raise Conflict("card_blocked", f"Card {card.number} is already blocked")
        now = utcnow()
        card.blocked, card.block_reason, card.block_comment = True, data.reason, data.comment
        card.blocked_at = card.updated_at = now
        _card_event(session, card, "card.blocked", reason=data.reason)

    return _change_card(db, number, actor, "block", block)


def unblock_card(db: Database, number: str, actor: Principal) -> CardOut:
    def unblock(session: Session, card: Card) -> None:
        if card.state == "replaced":
            raise Conflict("invalid_card_state", f"Card {card.number} was replaced; use its successor")
        if not card.blocked:
            raise Conflict("card_not_blocked", f"Card {card.number} is not blocked")
        card.blocked, card.block_reason, card.block_comment, card.blocked_at = False, None, None, None
        card.updated_at = utcnow()
        _card_event(session, card, "card.unblocked")

    return _change_card(db, number, actor, "unblock", unblock)


def replace_card(db: Database, number: str, new_number: str, actor: Principal) -> CardReplacement:
    """A blocked physical card gives way to a new physical card, activated for the same member."""
    with db.transaction() as session:
        old = _card_by_number(session, number, lock=True)
        if old.kind == "virtual":
            raise Conflict("virtual_card_not_replaceable", "A virtual card is not replaced; issue a new one")
        if old.state != "activated":
            raise Conflict(
                "invalid_card_state", f"Card {old.number} is {old.state}; only an activated card is replaced"
            )
        if not old.blocked:
            raise Conflict(
                "card_not_blocked", f"Block card {old.number} (lost, damaged...) before replacing it"
            )
        normalized = normalize_card_number(new_number)
        if normalized is None:
            raise AppError("invalid_card_number", f"{new_number!r} is not a card number", field="new_number")
        if normalized == old.number:
            raise AppError("same_card", "The new card must have another number", field="new_number")
        old_before = _card_out(session, old).model_dump(mode="json")
        new = session.scalar(select(Card).where(Card.number == normalized).with_for_update())
        new_before = _card_out(session, new).model_dump(mode="json") if new is not None else None
        now = utcnow()
        with _unique_violations(session, card_field="new_number"):
            if new is None:
                new = Card(
                    number=normalized,
                    kind="physical",
                    state="prepared",
                    blocked=False,
                    created_at=now,
                    updated_at=now,
                )
                session.add(new)
                session.flush()
            elif new.member_id is not None or new.state != "prepared":
                raise Conflict(
                    "card_not_available",
                    f"Card {new.number} is {new.state}" + (" and has a member" if new.member_id else ""),
                    field="new_number",
                )
            elif new.kind != "physical":
                raise Conflict(
                    "card_kind_mismatch", f"Card {new.number} is a {new.kind} card", field="new_number"
                )
            # The old card leaves "activated" first: the partial unique index sees one card at a time.
            old.state, old.replaced_by_id, old.updated_at = "replaced", new.id, now
            session.flush()
            new.member_id = old.member_id
            new.state, new.issued_at, new.activated_at, new.updated_at = (
                "activated",
                new.issued_at or now,
                now,
                now,
            )
        _card_event(session, old, "card.replaced", new_card=new.number)
        old_out, new_out = _cards_out(session, [old, new])
        record_audit(
            session, actor, "replace", "card", old.number, old_before, old_out.model_dump(mode="json")
        )
        record_audit(
            session, actor, "replacement", "card", new.number, new_before, new_out.model_dump(mode="json")
        )
        return CardReplacement(old_card=old_out, new_card=new_out)


# ---------------------------------------------------------------- attribute definitions


def _definition_out(d: AttributeDefinition) -> AttributeDefinitionOut:
    return AttributeDefinitionOut(
        code=d.code,
        name=d.name,
        type=d.type,
        required=d.required,
        choices=d.choices,
        constraints=d.constraints or {},
        created_at=d.created_at,
    )


def _checked_rules(
    kind: str, choices: list[str] | None, constraints: AttributeConstraints | None
) -> tuple[list[str] | None, dict[str, Any]]:
    """Choices and constraints that make sense for the type, as stored (decimals as strings)."""
    if kind == "enum":
        if not choices:
            raise AppError("choices_required", "An enum attribute needs its list of choices", field="choices")
        if len(set(choices)) != len(choices):
            raise AppError("duplicate_choice", "Each choice may appear once", field="choices")
    elif choices is not None:
        raise AppError(
            "choices_not_allowed", f"Only enum attributes have choices, not {kind}", field="choices"
        )
    rules = constraints.model_dump(exclude_none=True) if constraints is not None else {}
    allowed = {"integer": {"min", "max"}, "decimal": {"min", "max"}, "string": {"max_length", "pattern"}}
    for name in rules:
        if name not in allowed.get(kind, set()):
            raise AppError(
                "invalid_constraints",
                f"A {kind} attribute has no {name} constraint",
                field=f"constraints.{name}",
            )
    for name in ("min", "max"):
        if name in rules and kind == "integer" and rules[name] != rules[name].to_integral_value():
            raise AppError(
                "invalid_constraints", f"{name} of an integer attribute is whole", field=f"constraints.{name}"
            )
    if "min" in rules and "max" in rules and rules["min"] > rules["max"]:
        raise AppError("invalid_constraints", "min is greater than max", field="constraints.max")
    if "pattern" in rules:
        try:
            re.compile(rules["pattern"])
        except re.error as exc:
            raise AppError(
                "invalid_pattern", f"Not a regular expression: {exc}", field="constraints.pattern"
            ) from exc
    for name in ("min", "max"):
        if name in rules:
            rules[name] = format(rules[name], "f")
    return (list(choices) if choices is not None else None), rules


def _definition(session: Session, code: str) -> AttributeDefinition:
    definition = session.scalar(select(AttributeDefinition).where(AttributeDefinition.code == code))
    if definition is None:
        raise not_found("attribute", code)
    return definition


def create_attribute_definition(
    db: Database, data: AttributeDefinitionCreate, actor: Principal
) -> AttributeDefinitionOut:
    with db.transaction() as session:
        if session.scalar(select(AttributeDefinition.id).where(AttributeDefinition.code == data.code)):
            raise Conflict("duplicate_code", f"An attribute {data.code!r} already exists", field="code")
        choices, rules = _checked_rules(data.type, data.choices, data.constraints)
        definition = AttributeDefinition(
            code=data.code,
            name=data.name,
            type=data.type,
            required=data.required,
            choices=choices,
            constraints=rules,
            created_at=utcnow(),
        )
        session.add(definition)
        try:
            session.flush()
        except IntegrityError as exc:
            raise Conflict(
                "duplicate_code", f"An attribute {data.code!r} already exists", field="code"
            ) from exc
        out = _definition_out(definition)
        record_audit(
            session, actor, "create", "attribute_definition", data.code, None, out.model_dump(mode="json")
        )
        return out


def list_attribute_definitions(db: Database, limit: int, cursor: str | None) -> Page[AttributeDefinitionOut]:
    with db.reading() as session:
        stmt, limit = paginate(select(AttributeDefinition), AttributeDefinition.id, limit, cursor)
        page, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        return Page[AttributeDefinitionOut](items=[_definition_out(d) for d in page], next_cursor=next_cursor)


def get_attribute_definition(db: Database, code: str) -> AttributeDefinitionOut:
    with db.reading() as session:
        return _definition_out(_definition(session, code))


def update_attribute_definition(
    db: Database, code: str, data: AttributeDefinitionUpdate, actor: Principal
) -> AttributeDefinitionOut:
    """Later rules apply to later writes; values already stored are not re-checked."""
    with db.transaction() as session:
        definition = _definition(session, code)
        before = _definition_out(definition).model_dump(mode="json")
        fields = data.model_fields_set
        if "name" in fields:
            if data.name is None:
                raise AppError("missing_field", "An attribute needs a name", field="name")
            definition.name = data.name
        if "required" in fields:
            if data.required is None:
                raise AppError("missing_field", "required is true or false", field="required")
            definition.required = data.required
        if "choices" in fields or "constraints" in fields:
            current = AttributeConstraints.model_validate(definition.constraints or {})
            choices, rules = _checked_rules(
                definition.type,
                data.choices if "choices" in fields else definition.choices,
                data.constraints if "constraints" in fields else current,
            )
            definition.choices, definition.constraints = choices, rules
        out = _definition_out(definition)
        after = out.model_dump(mode="json")
        if after != before:
            record_audit(session, actor, "update", "attribute_definition", code, before, after)
        return out


# ---------------------------------------------------------------- bulk snapshots


SNAPSHOT_BATCH = 2000


def publish_snapshots(db: Database, *, changed_since: datetime | None = None) -> int:
    """Writes a ``member.updated`` snapshot event for every member (or those changed since a
    moment) to the outbox: members that arrived on a bulk path (import, demo) reach the
    warehouse, segments and profiles this way. Not ``member.registered``: that would start
    welcome chains for people who joined long ago. Returns how many were published."""
    published = 0
    last_id = 0
    stamp = utcnow().strftime("%Y%m%dT%H%M%S%f")
    while True:
        with db.transaction() as session:
            stmt = select(Member).where(Member.id > last_id, Member.merged_into_id.is_(None))
            if changed_since is not None:
                stmt = stmt.where(Member.updated_at >= changed_since)
            batch = list(session.scalars(stmt.order_by(Member.id).limit(SNAPSHOT_BATCH)))
            if not batch:
                return published
            consents: dict[int, dict[str, Any]] = {}
            for c in session.scalars(
                select(MemberConsent).where(MemberConsent.member_id.in_([m.id for m in batch]))
            ):
                consents.setdefault(c.member_id, {})[c.channel] = _consent_view(c)
            events = []
            for member in batch:
                snapshot = _questionnaire_values(member, consents.get(member.id, {}))
                events.append(
                    envelope(
                        f"member.updated:{member.id}:snapshot-{stamp}",
                        "member.updated",
                        member_id=member.id,
                        occurred_at=member.updated_at,
                        properties={"member": snapshot, "changed": [], "snapshot": True},
                    )
                )
            emit_many(session, events)
            published += len(batch)
            last_id = batch[-1].id
