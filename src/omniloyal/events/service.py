"""Event ingest: validate each event on its own, keep the valid ones, run member-event offers.

A batch answers per event (``accepted`` / ``duplicate`` / ``rejected`` with the error and the
event's index); one bad event never loses the others. Each event is stored and processed in
its own short transaction, so a repeated event id changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omniloyal.auth.schemas import Principal
from omniloyal.catalog import service as catalog
from omniloyal.catalog.models import Store
from omniloyal.db.engine import Database
from omniloyal.events.models import Event
from omniloyal.events.schemas import EventIn, EventResult, IngestResponse, MemberRefIn
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError, NotFound
from omniloyal.ledger import service as ledger
from omniloyal.members import service as members
from omniloyal.members.models import Card, Member
from omniloyal.offers import engine
from omniloyal.offers import snapshot as offers

MAX_BATCH = 1000
# Event types accepted today; the web/app tracking types arrive with the event-stream work.
ACCEPTED_TYPES = frozenset(engine.MEMBER_EVENTS) - {"purchase_confirmed"}


def _error_of(exc: ValidationError) -> dict[str, Any]:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or None
    err_type = str(first.get("type", "invalid_value"))
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(err_type, "invalid_value")
    return {"code": code, "message": str(first.get("msg", "invalid")), "field": field}


def ingest(
    db: Database, principal: Principal, body: Any, region: str, default_timezone: str
) -> IngestResponse:
    items = body.get("events") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise AppError("invalid_batch", 'Send a JSON list of events (or {"events": [...]})', field="events")
    if len(items) > MAX_BATCH:
        raise AppError("batch_too_large", f"At most {MAX_BATCH} events per request", field="events")
    results: list[EventResult] = []
    for index, raw in enumerate(items):
        try:
            event = EventIn.model_validate(raw)
        except ValidationError as exc:
            event_id = raw.get("id") if isinstance(raw, dict) else None
            results.append(
                EventResult(
                    index=index,
                    id=str(event_id) if event_id else None,
                    status="rejected",
                    error=_error_of(exc),
                )
            )
            continue
        try:
            with db.transaction() as session:
                results.append(_one(session, index, event, region, default_timezone))
        except AppError as exc:
            results.append(
                EventResult(index=index, id=event.id, status="rejected", error=exc.to_dict()["error"])
            )
        except IntegrityError:
            results.append(EventResult(index=index, id=event.id, status="duplicate"))
    return IngestResponse(
        accepted=sum(r.status == "accepted" for r in results),
        duplicates=sum(r.status == "duplicate" for r in results),
        rejected=sum(r.status == "rejected" for r in results),
        results=results,
    )


def _member_id(session: Session, ref: MemberRefIn | None, region: str) -> int:
    if ref is None:
        raise AppError("member_required", "A member event needs its member", field="member")
    if ref.id is not None:
        if session.get(Member, ref.id) is None:
            raise NotFound("unknown_member", f"No member {ref.id}", field="member.id")
        return ref.id
    if ref.card:
        card = session.scalar(select(Card).where(Card.number == ref.card.strip()))
        if card is None or card.member_id is None:
            raise NotFound("unknown_member", f"No member with card {ref.card!r}", field="member.card")
        return card.member_id
    member_id = members.find_member_id(
        session, phone=ref.phone, email=ref.email, external_id=ref.external_id, region=region
    )
    if member_id is None:
        raise NotFound("unknown_member", "No member with this identifier", field="member")
    return member_id


def _one(session: Session, index: int, event: EventIn, region: str, default_timezone: str) -> EventResult:
    if event.occurred_at.tzinfo is None:
        raise AppError("invalid_time", "occurred_at must carry a UTC offset", field="occurred_at")
    if event.type not in ACCEPTED_TYPES:
        raise AppError(
            "unknown_event_type",
            f"Event type {event.type!r} is not accepted here; one of: " + ", ".join(sorted(ACCEPTED_TYPES)),
            field="type",
        )
    if session.get(Event, event.id) is not None:
        return EventResult(index=index, id=event.id, status="duplicate")
    member_id = _member_id(session, event.member, region)
    store = catalog.store_by_code(session, event.store) if event.store else None
    outcome = run_member_event(
        session, event.type, event.id, member_id, event.occurred_at, store, event.properties, default_timezone
    )
    session.add(
        Event(
            id=event.id,
            type=event.type,
            occurred_at=event.occurred_at,
            received_at=utcnow(),
            member_id=member_id,
            source=event.source,
            store_code=event.store,
            properties=event.properties,
            outcome=outcome,
        )
    )
    session.flush()
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
                session.add(
                    Event(
                        id=event_id,
                        type="birthday",
                        occurred_at=moment,
                        received_at=utcnow(),
                        member_id=member_id,
                        source="scheduler",
                        properties={},
                        outcome=outcome,
                    )
                )
                session.flush()
                done += 1
        except IntegrityError:
            continue
    return done
