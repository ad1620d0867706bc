"""Event ingest: validate each event on its own, keep the valid ones, run member-event offers.

A batch answers per event (``accepted`` / ``duplicate`` / ``rejected`` with the error and the
event's index); one bad event never loses the others.

* Web, app and contact-centre events (``events.tracking.WEB_TYPES``) take the fast path: the
  whole batch is validated in one call, checked with a handful of queries (ids already in the
  outbox, members by each kind of identifier, stores, visitor links) in a read transaction,
  and written to the outbox with one INSERT in a short write transaction.
* Member events (``member_registered``, ``mobile_app_installed``...) run the offers engine,
  each in its own short transaction that stores the event, books its points and writes its
  envelope to the outbox.

Every accepted event becomes an :class:`EventEnvelope` of the same type in the outbox; an id
already there is answered ``duplicate`` and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pydantic_core
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import ARRAY, ColumnElement, any_, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omniloyal.auth.schemas import Principal
from omniloyal.catalog import service as catalog
from omniloyal.catalog.models import Store
from omniloyal.db.engine import Database
from omniloyal.events import tracking
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.models import Event, OutboxEvent
from omniloyal.events.outbox import OutboxRow, emit_many, emit_rows
from omniloyal.events.schemas import EventIn, EventResult, IngestResponse, MemberRefIn
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError, NotFound
from omniloyal.ledger import service as ledger
from omniloyal.members import service as members
from omniloyal.members.merge import resolve, resolve_merged
from omniloyal.members.models import AnonymousLink, Card, Member
from omniloyal.members.normalize import normalize_email, normalize_phone
from omniloyal.members.schemas import normalize_card_number
from omniloyal.offers import engine
from omniloyal.offers import snapshot as offers

MAX_BATCH = 1000
# Member events run the offers engine (points for installing the app, birthdays...).
MEMBER_TYPES = frozenset(engine.MEMBER_EVENTS) - {"purchase_confirmed"}
ACCEPTED_TYPES = MEMBER_TYPES | tracking.WEB_TYPES
# Roles that may send events; a "tracker" key (public, in a site's page) sends web types only.
TRACKER_ROLE = "tracker"
_RETRIES = 3


def _error_of(exc: ValidationError) -> dict[str, Any]:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or None
    err_type = str(first.get("type", "invalid_value"))
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(err_type, "invalid_value")
    return {"code": code, "message": str(first.get("msg", "invalid")), "field": field}


# A whole well-formed batch validated in one call: a third of the per-event cost of
# ``EventIn.model_validate`` item by item (which still answers the batches with a bad event).
_BATCH = TypeAdapter(list[EventIn])


def _validated(items: list[Any]) -> list[EventIn] | None:
    try:
        return _BATCH.validate_python(items)
    except ValidationError:
        return None


def batch_items(body: Any) -> list[Any]:
    """The events of a request body: a JSON list, or ``{"events": [...]}``."""
    items = body.get("events") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise AppError("invalid_batch", 'Send a JSON list of events (or {"events": [...]})', field="events")
    if len(items) > MAX_BATCH:
        raise AppError(
            "batch_too_large",
            f"At most {MAX_BATCH} events per request, got {len(items)}: split the batch",
            field="events",
            status_code=413,
        )
    return items


# Who a message was sent to, by message id: messaging registers one, so a click from a message
# (the tracker sends ``properties.message_id``) links the visitor even before any login.
MessageLookup = Callable[[Session, set[str]], dict[str, int]]
_message_lookups: list[MessageLookup] = []


def register_message_lookup(lookup: MessageLookup) -> None:
    """``lookup(session, message_ids) -> {message_id: member_id}`` for the messages it knows."""
    if lookup not in _message_lookups:
        _message_lookups.append(lookup)


@dataclass(slots=True)
class _Web:
    """A web event that passed the checks that need no database."""

    index: int
    event: EventIn
    occurred_at: datetime
    source: str
    properties: dict[str, Any]
    utm: dict[str, str]
    # (kind, normalised value) of the member identifier, if any
    ref: tuple[str, Any] | None
    member_id: int | None = None
    warning: str | None = None


@dataclass(slots=True)
class _Batch:
    web: list[_Web] = field(default_factory=list)
    member: list[tuple[int, EventIn]] = field(default_factory=list)


def ingest(
    db: Database, principal: Principal, body: Any, region: str, default_timezone: str
) -> IngestResponse:
    items = batch_items(body)
    results: list[EventResult | None] = [None] * len(items)
    batch = _Batch()
    cache: dict[tuple[str, str], Any] = {}
    valid = _validated(items)
    for index, raw in enumerate(items):
        if valid is not None:
            event = valid[index]
        else:
            try:
                event = EventIn.model_validate(raw)
            except ValidationError as exc:
                event_id = raw.get("id") if isinstance(raw, dict) else None
                results[index] = EventResult(
                    index=index,
                    id=str(event_id) if event_id else None,
                    status="rejected",
                    error=_error_of(exc),
                )
                continue
        try:
            _classify(batch, principal, index, event, region, cache)
        except AppError as exc:
            results[index] = EventResult(
                index=index, id=event.id, status="rejected", error=exc.to_dict()["error"]
            )
    if batch.web:
        for index, result in _ingest_web(db, principal, batch.web).items():
            results[index] = result
    for index, event in batch.member:
        results[index] = _ingest_member_event(db, principal, index, event, region, default_timezone)
    final = [r for r in results if r is not None]
    return IngestResponse.model_construct(
        accepted=sum(r.status == "accepted" for r in final),
        duplicates=sum(r.status == "duplicate" for r in final),
        rejected=sum(r.status == "rejected" for r in final),
        results=final,
    )


def _classify(
    batch: _Batch,
    principal: Principal,
    index: int,
    event: EventIn,
    region: str,
    cache: dict[tuple[str, str], Any],
) -> None:
    """Checks what needs no database; web events go to the fast path, member events aside."""
    if event.occurred_at.tzinfo is None or event.occurred_at.utcoffset() is None:
        raise AppError("invalid_time", "occurred_at must carry a UTC offset", field="occurred_at")
    if event.type in MEMBER_TYPES:
        if principal.role == TRACKER_ROLE:
            raise AppError(
                "forbidden_event_type",
                f"A tracker key sends web events only, not {event.type!r} (it would run offers)",
                field="type",
                status_code=403,
            )
        batch.member.append((index, event))
        return
    if event.type not in tracking.WEB_TYPES:
        raise AppError(
            "unknown_event_type",
            f"Event type {event.type!r} is not accepted here; one of: " + ", ".join(sorted(ACCEPTED_TYPES)),
            field="type",
        )
    properties = tracking.check_properties(event.type, event.properties)
    if event.url is not None:
        properties.setdefault("url", event.url)
    if event.referrer is not None:
        properties.setdefault("referrer", event.referrer)
    ref = _ref_key(event.member, region, cache) if event.member is not None else None
    if event.type == "identify" and ref is None:
        raise AppError("member_required", "An identify event names its member", field="member")
    if ref is None and event.anonymous_id is None and principal.role != "client":
        raise AppError(
            "identity_required", "An event needs its member or its anonymous_id (the visitor)", field="member"
        )
    batch.web.append(
        _Web(
            index=index,
            event=event,
            occurred_at=event.occurred_at.astimezone(UTC),
            source=tracking.check_source(event.source, event.type, "web"),
            properties=properties,
            utm=_utm(event, cache),
            ref=ref,
        )
    )


def _utm(event: EventIn, cache: dict[tuple[str, str], Any]) -> dict[str, str]:
    """The event's utm fields; a page URL is read once per batch (a tracker's batch repeats it)."""
    if event.utm is not None or not event.url:
        return tracking.utm_of(event.utm, event.url)
    key = ("url", event.url)
    found = cache.get(key)
    if found is None:
        found = cache[key] = tracking.utm_of(None, event.url)
    return dict(found)


def _ref_key(ref: MemberRefIn, region: str, cache: dict[tuple[str, str], Any]) -> tuple[str, Any]:
    """The first identifier given, normalised: ``id``, ``card``, ``external_id``, ``phone``, ``email``."""
    if ref.id is not None:
        return "id", ref.id
    for kind in ("card", "external_id", "phone", "email"):
        raw = getattr(ref, kind)
        if raw is None or not raw.strip():
            continue
        key = (kind, raw)
        if key not in cache:
            if kind == "card":
                number = normalize_card_number(raw)
                if number is None:
                    raise AppError(
                        "invalid_card_number", f"{raw!r} is not a card number", field="member.card"
                    )
                cache[key] = number
            elif kind == "phone":
                cache[key] = normalize_phone(raw, region, field="member.phone")
            elif kind == "email":
                cache[key] = normalize_email(raw, field="member.email")
            else:
                cache[key] = raw.strip()
        return kind, cache[key]
    raise AppError(
        "identifier_required", "Give one identifier: id, card, phone, email or external_id", field="member"
    )


# ---------------------------------------------------------------- web events: the fast path


@dataclass(slots=True)
class _Plan:
    """What a batch of web events writes, worked out from reads alone."""

    results: dict[int, EventResult]
    rows: list[OutboxRow]
    links: list[dict[str, Any]]
    link_events: list[EventEnvelope]


def _ingest_web(db: Database, principal: Principal, items: list[_Web]) -> dict[int, EventResult]:
    # The lookups run in a read transaction and the write transaction only inserts: SQLite's
    # single writer lock is held a few milliseconds per batch instead of the whole batch, so
    # concurrent requests and the dispatcher's stamps wait less. A concurrent request that
    # wrote one of these ids (or links) first fails the insert on its unique key: look again.
    for attempt in range(_RETRIES):
        with db.reading() as session:
            plan = _plan_web(session, principal, items)
        try:
            with db.transaction() as session:
                if plan.links:
                    session.execute(insert(AnonymousLink), plan.links)
                emit_rows(session, plan.rows)
                emit_many(session, plan.link_events)
            return plan.results
        except IntegrityError:
            if attempt == _RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _among(session: Session, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """``column IN values`` with the values as one parameter (a JSON array read by SQLite's
    ``json_each``, an array on PostgreSQL): a batch's thousand ids would be a thousand bound
    parameters, which cost more to render and bind than the index lookups themselves."""
    items = list(values)
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(items, ARRAY(column.type)))
    each = func.json_each(json.dumps(items, ensure_ascii=False)).table_valued("value")
    return column.in_(select(each.c.value))


def _member_ids(session: Session, refs: Iterable[tuple[str, Any]]) -> dict[tuple[str, Any], int]:
    """Members by identifier, one query per kind of identifier; merged members answer with the kept."""
    wanted: dict[str, set[Any]] = {}
    for kind, value in refs:
        wanted.setdefault(kind, set()).add(value)
    found: dict[tuple[str, Any], int] = {}
    columns = {
        "id": (Member.id, Member.id),
        "card": (Card.number, Card.member_id),
        "external_id": (Member.external_id, Member.id),
        "phone": (Member.phone, Member.id),
        "email": (Member.email, Member.id),
    }
    for kind, values in wanted.items():
        key_column, id_column = columns[kind]
        rows = session.execute(select(key_column, id_column).where(_among(session, key_column, values))).all()
        for value, member_id in rows:
            if member_id is not None:
                found[(kind, value)] = member_id
    merged = resolve_merged(session, set(found.values()))
    return {key: merged.get(member_id, member_id) for key, member_id in found.items()}


def _plan_web(session: Session, principal: Principal, items: list[_Web]) -> _Plan:
    results: dict[int, EventResult] = {}
    known = set(
        session.scalars(
            select(OutboxEvent.event_id).where(
                _among(session, OutboxEvent.event_id, {w.event.id for w in items})
            )
        )
    )
    members_by_ref = _member_ids(session, [w.ref for w in items if w.ref is not None])
    stores = {w.event.store for w in items if w.event.store}
    known_stores = set(session.scalars(select(Store.code).where(Store.code.in_(stores)))) if stores else set()
    own = resolve(session, principal.member_id) if principal.role == "client" else None
    accepted: list[_Web] = []
    seen: set[str] = set()
    for item in items:
        event = item.event
        if event.id in known or event.id in seen:
            results[item.index] = EventResult(index=item.index, id=event.id, status="duplicate")
            continue
        try:
            if event.store and event.store not in known_stores:
                raise NotFound("unknown_store", f"No store {event.store!r}", field="store")
            if item.ref is not None:
                item.member_id = members_by_ref.get(item.ref)
                if item.member_id is None:
                    if event.anonymous_id is None:
                        raise NotFound("unknown_member", "No member with this identifier", field="member")
                    # The site knows someone the loyalty programme does not: keep the visit.
                    item.warning = "unknown_member"
            if own is not None:
                if item.member_id is not None and item.member_id != own:
                    raise AppError(
                        "member_scope",
                        "A client key sends events of its own member only",
                        field="member",
                        status_code=403,
                    )
                item.member_id = own
        except AppError as exc:
            results[item.index] = EventResult(
                index=item.index, id=event.id, status="rejected", error=exc.to_dict()["error"]
            )
            continue
        seen.add(event.id)
        accepted.append(item)
    _members_of_messages(session, accepted)
    now = utcnow()
    # Also attributes the anonymous events of linked visitors: before the rows are serialised.
    links, link_events = _links(session, accepted, now)
    for item in accepted:
        results[item.index] = EventResult(
            index=item.index, id=item.event.id, status="accepted", warning=item.warning
        )
    return _Plan(results, [_outbox_row(item, now) for item in accepted], links, link_events)


def _members_of_messages(session: Session, accepted: list[_Web]) -> None:
    clicks = [
        w
        for w in accepted
        if w.member_id is None and w.event.anonymous_id and w.properties.get(tracking.MESSAGE_ID_PROPERTY)
    ]
    if not clicks or not _message_lookups:
        return
    ids = {str(w.properties[tracking.MESSAGE_ID_PROPERTY]) for w in clicks}
    found: dict[str, int] = {}
    for lookup in _message_lookups:
        found.update(lookup(session, ids - set(found)))
    merged = resolve_merged(session, set(found.values()))
    for item in clicks:
        member_id = found.get(str(item.properties[tracking.MESSAGE_ID_PROPERTY]))
        if member_id is not None:
            item.member_id = merged.get(member_id, member_id)


def _outbox_row(item: _Web, now: datetime) -> tuple[str, str, int | None, bytes]:
    """The event's envelope serialised as ``EventEnvelope.model_dump_json()`` would: the same
    fields in the same order, every value already checked (``EventIn``, ``_classify``), so
    no envelope object is built only to be dumped."""
    event = item.event
    payload = {
        "id": event.id,
        "type": event.type,
        "occurred_at": item.occurred_at,
        "received_at": now,
        "member_id": item.member_id,
        "anonymous_id": event.anonymous_id,
        "source": item.source,
        "store": event.store,
        "properties": item.properties,
        "utm": item.utm,
    }
    return event.id, event.type, item.member_id, pydantic_core.to_json(payload)


def _links(
    session: Session, accepted: list[_Web], now: datetime
) -> tuple[list[dict[str, Any]], list[EventEnvelope]]:
    """Visitor-member links: the new ones to store and announce (``identity.linked``), once per
    pair; an anonymous event of a visitor already linked is attributed to the member linked last."""
    visitors = {w.event.anonymous_id for w in accepted if w.event.anonymous_id is not None}
    if not visitors:
        return [], []
    rows = session.execute(
        select(AnonymousLink.anonymous_id, AnonymousLink.member_id, AnonymousLink.linked_at).where(
            _among(session, AnonymousLink.anonymous_id, visitors)
        )
    ).all()
    pairs: set[tuple[str, int]] = {(visitor, member_id) for visitor, member_id, _ in rows}
    latest: dict[str, tuple[datetime, int]] = {}
    for visitor, member_id, linked_at in rows:
        if visitor not in latest or linked_at >= latest[visitor][0]:
            latest[visitor] = (linked_at, member_id)
    merged = resolve_merged(session, {member_id for _, member_id in pairs})
    new_rows: list[dict[str, Any]] = []
    envelopes: list[EventEnvelope] = []
    for item in accepted:
        anonymous_id = item.event.anonymous_id
        if anonymous_id is None:
            continue
        if item.member_id is None:
            # (An event naming someone the programme does not know is not given to the last member.)
            if item.ref is None and anonymous_id in latest:
                member_id = latest[anonymous_id][1]
                item.member_id = merged.get(member_id, member_id)
            continue
        if not (
            item.event.type in tracking.IDENTIFYING_TYPES
            or item.properties.get(tracking.MESSAGE_ID_PROPERTY) is not None
        ):
            continue
        pair = (anonymous_id, item.member_id)
        if pair in pairs:
            continue
        pairs.add(pair)
        latest[anonymous_id] = (now, item.member_id)
        new_rows.append(
            {
                "anonymous_id": anonymous_id,
                "member_id": item.member_id,
                "linked_at": now,
                "event_id": item.event.id,
            }
        )
        envelopes.append(
            EventEnvelope(
                id=tracking.identity_link_id(anonymous_id, item.member_id),
                type="identity.linked",
                occurred_at=item.occurred_at,
                received_at=now,
                member_id=item.member_id,
                anonymous_id=anonymous_id,
                source=item.source,
                store=item.event.store,
                properties={
                    "anonymous_id": anonymous_id,
                    "via": item.event.type,
                    "event_id": item.event.id,
                    "history_days": tracking.ANONYMOUS_HISTORY_DAYS,
                },
                utm={},
            )
        )
    return new_rows, envelopes


# ---------------------------------------------------------------- member events: offers


def _ingest_member_event(
    db: Database, principal: Principal, index: int, event: EventIn, region: str, default_timezone: str
) -> EventResult:
    try:
        with db.transaction() as session:
            return _one(session, principal, index, event, region, default_timezone)
    except AppError as exc:
        return EventResult(index=index, id=event.id, status="rejected", error=exc.to_dict()["error"])
    except IntegrityError:
        return EventResult(index=index, id=event.id, status="duplicate")


def _member_id(session: Session, ref: MemberRefIn | None, region: str) -> int:
    if ref is None:
        raise AppError("member_required", "A member event needs its member", field="member")
    if ref.id is not None:
        if session.get(Member, ref.id) is None:
            raise NotFound("unknown_member", f"No member {ref.id}", field="member.id")
        return resolve(session, ref.id) or ref.id
    if ref.card:
        card = session.scalar(select(Card).where(Card.number == ref.card.strip()))
        if card is None or card.member_id is None:
            raise NotFound("unknown_member", f"No member with card {ref.card!r}", field="member.card")
        return resolve(session, card.member_id) or card.member_id
    member_id = members.find_member_id(
        session, phone=ref.phone, email=ref.email, external_id=ref.external_id, region=region
    )
    if member_id is None:
        raise NotFound("unknown_member", "No member with this identifier", field="member")
    return resolve(session, member_id) or member_id


def _one(
    session: Session, principal: Principal, index: int, event: EventIn, region: str, default_timezone: str
) -> EventResult:
    if session.get(Event, event.id) is not None:
        return EventResult(index=index, id=event.id, status="duplicate")
    if session.scalar(select(OutboxEvent.seq).where(OutboxEvent.event_id == event.id)) is not None:
        return EventResult(index=index, id=event.id, status="duplicate")
    if principal.role == "client":
        own = resolve(session, principal.member_id)
        claimed = own if event.member is None else _member_id(session, event.member, region)
        if own is None or claimed != own:
            raise AppError(
                "member_scope",
                "A client key sends events of its own member only",
                field="member",
                status_code=403,
            )
        member_id = own
    else:
        member_id = _member_id(session, event.member, region)
    store = catalog.store_by_code(session, event.store) if event.store else None
    outcome = run_member_event(
        session, event.type, event.id, member_id, event.occurred_at, store, event.properties, default_timezone
    )
    source = tracking.check_source(event.source, event.type, "loyalty")
    now = utcnow()
    session.add(
        Event(
            id=event.id,
            type=event.type,
            occurred_at=event.occurred_at,
            received_at=now,
            member_id=member_id,
            anonymous_id=event.anonymous_id,
            source=event.source,
            store_code=event.store,
            properties=event.properties,
            outcome=outcome,
        )
    )
    session.flush()
    emit_many(
        session,
        [
            EventEnvelope(
                id=event.id,
                type=event.type,
                occurred_at=event.occurred_at.astimezone(UTC),
                received_at=now,
                member_id=member_id,
                anonymous_id=event.anonymous_id,
                source=source,
                store=event.store,
                properties=event.properties,
                utm=tracking.utm_of(event.utm, event.url),
            )
        ],
    )
    return EventResult(
        index=index, id=event.id, status="accepted", accrued=outcome["accrued"], offers=outcome["offers"]
    )


def run_member_event(
    session: Session,
    event_type: str,
    event_id: str,
    member_id: int,
    occurred_at: datetime,
    store: Store | None,
    properties: dict[str, Any],
    default_timezone: str,
) -> dict[str, Any]:
    """Runs the member-event offers (e.g. 100 points for installing the app) and books their points."""
    member = session.get(Member, member_id)
    assert member is not None
    cards = session.scalars(select(Card).where(Card.member_id == member_id, Card.state == "activated")).all()
    card = next((c for c in cards if not c.blocked), None)
    facts = engine.MemberFacts(
        id=member_id,
        card_number=card.number if card else None,
        card_state=card.state if card else None,
        can_spend=card is not None,
        audiences=offers.member_audiences(session, member_id),
        attributes={
            k: v
            for k, v in {
                **(member.attributes or {}),
                "first_name": member.first_name,
                "gender": member.gender,
                "city": member.city,
                "birth_date": member.birth_date,
            }.items()
            if v is not None
        },
        offer_uses=offers.member_offer_uses(session, member_id),
    )
    zone = ZoneInfo(store.timezone if store else (member.timezone or default_timezone))
    result = engine.evaluate_member_event(
        offers.active_snapshot(session),
        engine.MemberEvent(
            event=event_type,
            local_time=engine.local_time(occurred_at, zone),
            member=facts,
            store_code=store.code if store else None,
            channel=store.channel if store else None,
            store_attributes=store.attributes if store else {},
            properties=properties,
            exhausted_offers=offers.exhausted_offers(session),
        ),
    )
    accrued: dict[str, Decimal] = {}
    points: dict[int, Decimal] = {}
    for accrual in result.accruals:
        entity_id = None
        if accrual.legal_entity:
            entity_id = catalog.legal_entity_id_by_code(session, accrual.legal_entity)
        elif store is not None:
            entity_id = store.legal_entity_id
        ledger.accrue(
            session,
            member_id=member_id,
            currency=accrual.currency,
            amount=accrual.amount,
            legal_entity_id=entity_id,
            source="offer",
            source_ref=f"event:{event_id}",
            reason=f"offer {accrual.offer_id} for {event_type}",
            at=utcnow(),
            activation_delay=timedelta(days=accrual.activation_delay_days),
            lifetime=timedelta(days=accrual.lifetime_days) if accrual.lifetime_days is not None else None,
        )
        accrued[accrual.currency] = accrued.get(accrual.currency, Decimal(0)) + accrual.amount
        points[accrual.offer_id] = points.get(accrual.offer_id, Decimal(0)) + accrual.amount
    offers.record_use(session, offer_ids=result.applied_offers, member_id=member_id, points=points, money={})
    return {"accrued": {k: str(v) for k, v in accrued.items()}, "offers": result.applied_offers}


def _birthday_key(session: Session) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(Member.birth_date, "MM-DD")
    return func.strftime("%m-%d", Member.birth_date)


def run_birthdays(db: Database, today: date, default_timezone: str = "Europe/Moscow") -> int:
    """The daily ``birthday`` event for members born on this day (29 February celebrates on 1 March
    in common years). Idempotent: the event id is ``birthday:<member>:<date>``."""
    keys = [today.strftime("%m-%d")]
    leap = today.year % 4 == 0 and (today.year % 100 != 0 or today.year % 400 == 0)
    if today.month == 3 and today.day == 1 and not leap:
        keys.append("02-29")
    with db.reading() as session:
        if not offers.active_snapshot(session).by_event.get("birthday"):
            return 0  # nobody listens: do not scan the member base
        member_ids: Iterable[int] = list(
            session.scalars(select(Member.id).where(_birthday_key(session).in_(keys)))
        )
    done = 0
    moment = datetime.combine(today, datetime.min.time()).replace(tzinfo=ZoneInfo(default_timezone))
    for member_id in member_ids:
        event_id = f"birthday:{member_id}:{today.isoformat()}"
        try:
            with db.transaction() as session:
                if session.get(Event, event_id) is not None:
                    continue
                outcome = run_member_event(
                    session, "birthday", event_id, member_id, moment, None, {}, default_timezone
                )
                now = utcnow()
                session.add(
                    Event(
                        id=event_id,
                        type="birthday",
                        occurred_at=moment,
                        received_at=now,
                        member_id=member_id,
                        source="scheduler",
                        properties={},
                        outcome=outcome,
                    )
                )
                session.flush()
                emit_many(
                    session,
                    [
                        EventEnvelope(
                            id=event_id,
                            type="birthday",
                            occurred_at=moment.astimezone(UTC),
                            received_at=now,
                            member_id=member_id,
                            source="loyalty",
                        )
                    ],
                )
                done += 1
        except IntegrityError:
            continue
    return done
