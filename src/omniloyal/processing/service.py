"""Purchase processing: calculate → confirm | cancel, refund, balance, offline cheques.

Two-phase, as tills expect: ``calculate`` prices the cheque and *reserves* the points the buyer
pays with; balances change only on ``confirm`` (one short transaction: the reserved write-off,
the planned accruals, the offer counters); ``cancel`` releases the reservation. Every request
is keyed by the till's ``operation_id`` within its store: a repeat returns the first answer and
changes nothing; the same id with a different body is refused (``operation_conflict``).

Concurrent operations of one member are serialised by the ledger (row locks on the member's
accounts on PostgreSQL, one writer at a time on SQLite), so parallel write-offs never overspend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omniloyal.auth.schemas import Principal
from omniloyal.catalog import service as catalog
from omniloyal.catalog.service import StoreFacts
from omniloyal.db.engine import Database
from omniloyal.events.outbox import emit_many
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError, Conflict, Forbidden, NotFound
from omniloyal.ledger import refunds
from omniloyal.ledger import service as ledger
from omniloyal.ledger.models import Currency
from omniloyal.members import service as members
from omniloyal.members.models import Card, Member
from omniloyal.offers import engine
from omniloyal.offers import snapshot as offers
from omniloyal.processing import events as purchase_events
from omniloyal.processing.models import Operation, PurchaseLine
from omniloyal.processing.schemas import (
    BalanceOut,
    BalanceResponse,
    CalculateRequest,
    CalculateResponse,
    ChequeIn,
    ConfirmResponse,
    ExplainOut,
    Identifier,
    LineOut,
    MemberRef,
    Messages,
    OfflineBatch,
    OfflineResponse,
    OfflineResult,
    OperationRef,
    RefundRequest,
    RefundResponse,
    Totals,
)

ZERO = Decimal(0)
CENT = Decimal("0.01")


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _reservation_key(store_id: int, operation_id: str) -> str:
    return f"{store_id}:{operation_id}"


def _store(session: Session, principal: Principal, code: str | None) -> StoreFacts:
    """The store the operation happens in: a pos key's own, or the one named by an admin."""
    if principal.role == "pos":
        store = catalog.store_facts(session, principal.store_id) if principal.store_id is not None else None
        if store is None:
            raise AppError("unknown_store", "The store of this pos key no longer exists", status_code=404)
        if code is not None and code != store.code:
            raise Forbidden(
                "store_mismatch",
                f"This pos key is bound to store {store.code!r}, not {code!r}",
                field="store",
            )
        return store
    if not code:
        raise AppError("store_required", "Name the store (its code) when not using a pos key", field="store")
    return catalog.store_facts_by_code(session, code)


# ---------------------------------------------------------------- identification


class _Buyer:
    __slots__ = ("can_spend", "card", "member")

    def __init__(self, member: Member, card: Card | None, can_spend: bool) -> None:
        self.member = member
        self.card = card
        self.can_spend = can_spend

    def ref(self) -> MemberRef:
        return MemberRef(
            id=self.member.id,
            card=self.card.number if self.card else None,
            card_state=self.card.state if self.card else None,
            can_spend=self.can_spend,
        )


def _spendable(card: Card) -> bool:
    return card.state == "activated" and not card.blocked


def _identify(session: Session, identifier: Identifier | None, region: str) -> _Buyer | None:
    if identifier is None:
        return None
    if identifier.card:
        card = members.card_for_processing(session, identifier.card)  # unknown_card / card_blocked
        owner = session.get(Member, card.member_id) if card.member_id is not None else None
        if owner is None:
            # A card handed out in a store before registration still earns points: it gets an
            # anonymous member now, registration fills in the questionnaire later.
            owner = Member(status="active", registered_at=utcnow())
            session.add(owner)
            session.flush()
            card.member_id = owner.id
        return _Buyer(owner, card, _spendable(card))
    member_id = members.find_member_id(session, phone=identifier.phone, email=identifier.email, region=region)
    field = "identifier.phone" if identifier.phone else "identifier.email"
    member = session.get(Member, member_id) if member_id is not None else None
    if member is None:
        raise NotFound("unknown_member", "No member with this identifier", field=field)
    cards = session.scalars(select(Card).where(Card.member_id == member.id, Card.state == "activated")).all()
    active = next((c for c in cards if not c.blocked), None)
    return _Buyer(member, active, active is not None)


def _member_attributes(member: Member) -> dict[str, Any]:
    facts: dict[str, Any] = dict(member.attributes or {})
    facts.update(
        {
            "first_name": member.first_name,
            "last_name": member.last_name,
            "middle_name": member.middle_name,
            "gender": member.gender,
            "city": member.city,
            "birth_date": member.birth_date,
            "children_count": len(member.children or []),
            "pets": list(member.pets or []),
            "preferred_categories": list(member.preferred_categories or []),
        }
    )
    return {k: v for k, v in facts.items() if v is not None}


def _balances(session: Session, member_id: int) -> list[BalanceOut]:
    return [
        BalanceOut.model_construct(
            currency=b.currency, available=b.available, pending=b.pending, reserved=b.reserved
        )
        for b in ledger.spendable_balances(session, member_id, utcnow())
    ]


def _after_reserving(balances: list[BalanceOut], currency: str, amount: Decimal) -> list[BalanceOut]:
    """The balance once ``amount`` is held: the reservation was checked against this very balance
    in this transaction, so no second read is needed."""
    return [
        BalanceOut.model_construct(
            currency=b.currency,
            available=b.available - amount,
            pending=b.pending,
            reserved=b.reserved + amount,
        )
        if b.currency == currency
        else b
        for b in balances
    ]


def _member_facts(session: Session, buyer: _Buyer, balances: list[BalanceOut]) -> engine.MemberFacts:
    return engine.MemberFacts(
        id=buyer.member.id,
        card_number=buyer.card.number if buyer.card else None,
        card_state=buyer.card.state if buyer.card else None,
        can_spend=buyer.can_spend,
        audiences=offers.member_audiences(session, buyer.member.id),
        attributes=_member_attributes(buyer.member),
        available={b.currency: b.available for b in balances},
        offer_uses=offers.member_offer_uses(session, buyer.member.id),
    )


def _engine_cheque(
    session: Session,
    store: StoreFacts,
    cheque: ChequeIn,
    buyer: engine.MemberFacts | None,
    *,
    write_off: tuple[str, Decimal] | None = None,
    excluded: frozenset[int] = frozenset(),
) -> engine.Cheque:
    facts = catalog.product_facts_cached(session, [line.sku for line in cheque.lines])
    lines = []
    for line in cheque.lines:
        fact = facts.get(line.sku)
        lines.append(
            engine.Line(
                line=line.line,
                sku=line.sku,
                price=line.price,
                quantity=line.quantity,
                amount=line.amount,
                min_price=line.min_price,
                category_path=fact.category_path if fact else None,
                brand=fact.brand if fact else None,
                groups=fact.groups if fact else frozenset(),
            )
        )
    return engine.Cheque(
        local_time=engine.local_time(cheque.created_at, ZoneInfo(store.timezone)),
        store_code=store.code,
        channel=store.channel,
        store_attributes=store.attributes or {},
        lines=tuple(lines),
        payments=tuple(engine.Payment(p.method, p.amount) for p in cheque.payments),
        member=buyer,
        write_off_currency=write_off[0] if write_off else None,
        write_off_amount=write_off[1] if write_off else ZERO,
        exhausted_offers=excluded,
    )


def _plan(result: engine.Result) -> list[dict[str, Any]]:
    return [
        {
            "currency": a.currency,
            "amount": str(a.amount),
            "offer_id": a.offer_id,
            "activation_delay_days": a.activation_delay_days,
            "lifetime_days": a.lifetime_days,
            "legal_entity": a.legal_entity,
            "line": a.line,
        }
        for a in result.accruals
    ]


def _amounts(values: dict[str, Decimal]) -> dict[str, str]:
    return {k: str(v) for k, v in values.items() if v}


# ---------------------------------------------------------------- calculate


def _purchase_lines(
    operation_id: int,
    lines: Iterable[Any],
    outcomes: Iterable[engine.LineResult],
    *,
    with_discount: bool = True,
) -> list[dict[str, Any]]:
    """Rows for one bulk INSERT (the ORM would send one statement per line)."""
    return [
        {
            "operation_id": operation_id,
            "line": line.line,
            "sku": line.sku,
            "price": line.price,
            "quantity": line.quantity,
            "amount": line.amount,
            "discount": outcome.discount if with_discount else ZERO,
            "write_off": _amounts(outcome.write_off) if with_discount else {},
            "bonus": _amounts(outcome.bonus),
            "refunded_quantity": ZERO,
            "offers": list(outcome.offers),
        }
        for line, outcome in zip(lines, outcomes, strict=True)
    ]


def calculate(
    db: Database, principal: Principal, request: CalculateRequest, region: str
) -> CalculateResponse:
    payload = request.model_dump(mode="json", exclude={"explain"})
    digest = _digest(payload)
    try:
        with db.transaction() as session:
            return _calculate(session, principal, request, region, digest)
    except IntegrityError:
        # The same operation_id raced in twice: the other request stored it; answer as it did.
        with db.transaction() as session:
            store = _store(session, principal, request.store)
            existing = _operation(session, store, request.operation_id)
            if existing is None:
                raise
            return _replay(existing, digest)


# Prebuilt: building the expression costs more than running it, and tills ask on every cheque.
_OPERATION = select(Operation).where(
    Operation.store_id == bindparam("store_id"), Operation.operation_id == bindparam("operation_id")
)
_OPERATION_LOCKED = _OPERATION.with_for_update()


def _operation(
    session: Session, store: StoreFacts, operation_id: str, *, lock: bool = False
) -> Operation | None:
    return session.scalar(
        _OPERATION_LOCKED if lock else _OPERATION, {"store_id": store.id, "operation_id": operation_id}
    )


def _replay(existing: Operation, digest: str) -> CalculateResponse:
    if existing.kind != "purchase":
        raise Conflict(
            "operation_conflict",
            f"Operation {existing.operation_id!r} is a {existing.kind}",
            field="operation_id",
        )
    if existing.plan.get("request_digest") != digest:
        raise Conflict(
            "operation_conflict",
            f"Operation {existing.operation_id!r} was already calculated with a different request",
            field="operation_id",
        )
    answer = CalculateResponse.model_validate(existing.response)
    answer.state = existing.state  # type: ignore[assignment]
    return answer


def _calculate(
    session: Session, principal: Principal, request: CalculateRequest, region: str, digest: str
) -> CalculateResponse:
    store = _store(session, principal, request.store)
    existing = _operation(session, store, request.operation_id)
    if existing is not None:
        return _replay(existing, digest)
    buyer = _identify(session, request.identifier, region)
    wanted = request.write_off
    if wanted is not None:
        _check_currency(session, wanted.currency, "write_off.currency")
        if buyer is None:
            raise AppError(
                "member_required", "Paying with points needs an identified member", field="identifier"
            )
        if not buyer.can_spend:
            raise Conflict(
                "card_not_activated", "Points can be spent only with an activated card", field="identifier"
            )
    balances = _balances(session, buyer.member.id) if buyer else []
    facts = _member_facts(session, buyer, balances) if buyer else None
    snapshot, exhausted = offers.active_offers(session)
    cheque = _engine_cheque(
        session,
        store,
        request.cheque,
        facts,
        write_off=(wanted.currency, wanted.amount) if wanted else None,
        excluded=exhausted,
    )
    result = engine.calculate(snapshot, cheque, explain=request.explain)
    if buyer is None:
        # Nobody to credit: an anonymous purchase gets discounts only.
        result.accruals.clear()
        for line in result.lines:
            line.bonus.clear()
    if wanted is not None:
        allowed = result.max_write_off.get(wanted.currency, ZERO)
        if wanted.amount > allowed:
            available = next((b.available for b in balances if b.currency == wanted.currency), ZERO)
            code = "insufficient_points" if wanted.amount > available else "write_off_limit_exceeded"
            raise Conflict(
                code,
                f"At most {allowed} {wanted.currency} can pay for this cheque (requested {wanted.amount})",
                field="write_off.amount",
                details={"max_write_off": str(allowed), "available": str(available)},
            )
        assert buyer is not None
        ledger.reserve(
            session,
            member_id=buyer.member.id,
            currency=wanted.currency,
            amount=wanted.amount,
            operation_id=_reservation_key(store.id, request.operation_id),
        )
        balances = _after_reserving(balances, wanted.currency, wanted.amount)
    response = _response(request, store, buyer, result, balances)
    amount = sum((line.amount for line in request.cheque.lines), ZERO)
    # Core inserts: the ORM unit of work would cost more than both statements themselves.
    connection = session.connection()
    operation_pk = connection.execute(
        _OPERATIONS.insert().returning(_OPERATIONS.c.id),
        dict(
            operation_id=request.operation_id,
            store_id=store.id,
            kind="purchase",
            state="calculated",
            member_id=buyer.member.id if buyer else None,
            card_id=buyer.card.id if buyer and buyer.card else None,
            cheque_number=request.cheque.number,
            cheque_at=request.cheque.created_at,
            amount=amount,
            discount=result.discount_total,
            write_off=_amounts(result.write_off),
            accrual=_amounts(result.bonus_total()),
            plan={
                "request_digest": digest,
                "accruals": _plan(result),
                "offers": result.applied_offers,
                "discounts": {str(k): f"{v:f}" for k, v in result.offer_discounts.items()},
            },
            response=response.model_dump(mode="json", exclude={"explain"}),
            payments=[p.model_dump(mode="json") for p in request.cheque.payments],
            created_at=utcnow(),
            purchase_id=None,
            confirmed_at=None,
            cancelled_at=None,
        ),
    ).scalar_one()
    connection.execute(
        _PURCHASE_LINES.insert(), _purchase_lines(operation_pk, request.cheque.lines, result.lines)
    )
    return response


def _check_currency(session: Session, code: str, field: str) -> None:
    try:
        ledger.currency_precision(session, code)
    except NotFound:
        raise AppError("unknown_currency", f"No currency {code!r}", field=field) from None


def _response(
    request: CalculateRequest,
    store: StoreFacts,
    buyer: _Buyer | None,
    result: engine.Result,
    balances: list[BalanceOut],
) -> CalculateResponse:
    def money(value: Decimal) -> Decimal:
        return value.quantize(CENT, rounding=ROUND_HALF_UP)

    def points(values: dict[str, Decimal]) -> dict[str, Decimal]:
        return {k: money(v) for k, v in values.items() if v}

    lines = [
        LineOut(
            line=line.line,
            sku=line.sku,
            amount=money(line.amount),
            discount=money(line.discount),
            amount_after_discount=money(line.amount_after_discount),
            write_off=points(line.write_off),
            bonus=points(line.bonus),
            offers=list(line.offers),
        )
        for line in result.lines
    ]
    amount = result.amount_total
    discount = result.discount_total
    paid_points = sum(result.write_off.values(), ZERO)
    totals = Totals(
        amount=money(amount),
        discount=money(discount),
        amount_after_discount=money(amount - discount),
        write_off=points(result.write_off),
        bonus=points(result.bonus_total()),
        to_pay=money(amount - discount - paid_points),
    )
    explain = (
        [
            ExplainOut(
                offer_id=e.offer_id,
                offer_name=e.offer_name,
                event=e.event,
                applied=e.applied,
                reason=e.reason,
                lines=e.lines,
            )
            for e in result.explain
        ]
        if request.explain
        else None
    )
    return CalculateResponse(
        operation_id=request.operation_id,
        store=store.code,
        state="calculated",
        member=buyer.ref() if buyer else None,
        lines=lines,
        totals=totals,
        balance=balances,
        max_write_off={k: money(v) for k, v in result.max_write_off.items()} if buyer else {},
        messages=Messages(cheque=result.cheque_messages, cashier=result.cashier_messages),
        explain=explain,
    )


# ---------------------------------------------------------------- confirm / cancel


def _legal_entity_for(session: Session, store: StoreFacts, code: str | None) -> int:
    if code:
        entity_id = catalog.legal_entity_id(session, code)
        if entity_id is not None:
            return entity_id
    # Points for a purchase are funded by the legal entity the store belongs to.
    return store.legal_entity_id


def _book_accruals(
    session: Session,
    store: StoreFacts,
    member_id: int,
    plan: Iterable[dict[str, Any]],
    *,
    source: str,
    source_ref: str,
    at: datetime,
) -> dict[str, Decimal]:
    # One lot per offer and terms, not per line: a 10-line cheque earning 5% makes one lot.
    lots: dict[tuple[str, int, int, int | None, str | None], Decimal] = {}
    for item in plan:
        amount = Decimal(item["amount"])
        if amount <= 0:
            continue
        lifetime = item.get("lifetime_days")
        terms = (
            item["currency"],
            int(item["offer_id"]),
            int(item.get("activation_delay_days") or 0),
            int(lifetime) if lifetime is not None else None,
            item.get("legal_entity"),
        )
        lots[terms] = lots.get(terms, ZERO) + amount
    return ledger.accrue_lots(
        session,
        member_id=member_id,
        plans=[
            ledger.LotPlan(
                currency=currency,
                amount=amount,
                legal_entity_id=_legal_entity_for(session, store, legal_entity),
                reason=f"offer {offer_id}",
                activation_delay=timedelta(days=delay),
                lifetime=timedelta(days=lifetime_days) if lifetime_days is not None else None,
            )
            for (currency, offer_id, delay, lifetime_days, legal_entity), amount in lots.items()
        ],
        source=source,
        source_ref=source_ref,
        at=at,
    )


_OPERATIONS = cast(Table, Operation.__table__)
_PURCHASE_LINES = cast(Table, PurchaseLine.__table__)
_LINES_OF = (
    select(_PURCHASE_LINES)
    .where(_PURCHASE_LINES.c.operation_id == bindparam("operation_id"))
    .order_by(_PURCHASE_LINES.c.line)
)


def _lines_of(session: Session, operation: Operation) -> list[Any]:
    """The cheque's lines as read-only rows (same attribute names as ``PurchaseLine``)."""
    return list(session.connection().execute(_LINES_OF, {"operation_id": operation.id}))


def _offer_spending(
    operation: Operation, lines: Iterable[PurchaseLine]
) -> tuple[dict[int, Decimal], dict[int, Decimal]]:
    points: dict[int, Decimal] = {}
    for item in operation.plan.get("accruals", []):
        points[int(item["offer_id"])] = points.get(int(item["offer_id"]), ZERO) + Decimal(item["amount"])
    discounts = operation.plan.get("discounts")
    if discounts is not None:  # what each offer itself took off, as the engine counted it
        return points, {int(k): Decimal(v) for k, v in discounts.items()}
    money: dict[int, Decimal] = {}
    for line in lines:
        if line.discount and line.offers:
            # Calculated before offers' own discounts were recorded: split evenly.
            share = (line.discount / len(line.offers)).quantize(CENT)
            for offer_id in line.offers:
                money[offer_id] = money.get(offer_id, ZERO) + share
    return points, money


def _emit_confirmed(
    session: Session, operation: Operation, store: StoreFacts, lines: list[PurchaseLine]
) -> None:
    """``purchase.confirmed`` with the whole cheque, in the confirming transaction."""
    facts = catalog.product_facts_cached(session, {line.sku for line in lines})
    categories = {line.sku: facts[line.sku].category_path if line.sku in facts else None for line in lines}
    event = purchase_events.purchase_confirmed(
        operation, lines, store_code=store.code, channel=store.channel, categories=categories
    )
    emit_many(session, [event])


def confirm(db: Database, principal: Principal, request: OperationRef) -> ConfirmResponse:
    with db.transaction() as session:
        store = _store(session, principal, request.store)
        operation = _operation(session, store, request.operation_id, lock=True)
        if operation is None or operation.kind != "purchase":
            raise NotFound(
                "unknown_operation",
                f"No calculated purchase {request.operation_id!r} in this store",
                field="operation_id",
            )
        if operation.state == "confirmed":
            return ConfirmResponse.model_validate(operation.response["confirmation"])
        if operation.state == "cancelled":
            raise Conflict(
                "operation_cancelled", "This purchase was cancelled; calculate it again", field="operation_id"
            )
        now = utcnow()
        key = _reservation_key(store.id, operation.operation_id)
        written_off: dict[str, Decimal] = {}
        accrued: dict[str, Decimal] = {}
        if operation.member_id is not None:
            if operation.write_off:
                ledger.confirm_reservation(
                    session, key, source="purchase", reason=f"cheque {operation.cheque_number}"
                )
                written_off = {k: Decimal(v) for k, v in operation.write_off.items()}
            accrued = _book_accruals(
                session,
                store,
                operation.member_id,
                operation.plan.get("accruals", []),
                source="purchase",
                source_ref=key,
                at=now,
            )
        lines = _lines_of(session, operation)
        points, money = _offer_spending(operation, lines)
        offers.record_use(
            session,
            offer_ids=operation.plan.get("offers", []),
            member_id=operation.member_id,
            points=points,
            money=money,
        )
        balances = _balances(session, operation.member_id) if operation.member_id is not None else []
        answer = ConfirmResponse(
            operation_id=operation.operation_id,
            store=store.code,
            state="confirmed",
            accrued=accrued,
            written_off=written_off,
            balance=balances,
        )
        operation.state = "confirmed"
        operation.confirmed_at = now
        operation.response = {
            **operation.response,
            "state": "confirmed",
            "confirmation": answer.model_dump(mode="json"),
        }
        _emit_confirmed(session, operation, store, lines)
        return answer


def cancel(db: Database, principal: Principal, request: OperationRef) -> ConfirmResponse:
    with db.transaction() as session:
        store = _store(session, principal, request.store)
        operation = _operation(session, store, request.operation_id, lock=True)
        if operation is None or operation.kind != "purchase":
            raise NotFound(
                "unknown_operation",
                f"No calculated purchase {request.operation_id!r} in this store",
                field="operation_id",
            )
        if operation.state == "confirmed":
            raise Conflict(
                "operation_confirmed", "A confirmed purchase is undone with a refund", field="operation_id"
            )
        if operation.state == "calculated":
            if operation.write_off and operation.member_id is not None:
                ledger.release_reservation(session, _reservation_key(store.id, operation.operation_id))
            operation.state = "cancelled"
            operation.cancelled_at = utcnow()
            operation.response = {**operation.response, "state": "cancelled"}
        balances = _balances(session, operation.member_id) if operation.member_id is not None else []
        return ConfirmResponse(
            operation_id=operation.operation_id, store=store.code, state="cancelled", balance=balances
        )


# ---------------------------------------------------------------- refund


def refund(db: Database, principal: Principal, request: RefundRequest) -> RefundResponse:
    digest = _digest(request.model_dump(mode="json"))
    with db.transaction() as session:
        store = _store(session, principal, request.store)
        existing = _operation(session, store, request.operation_id)
        if existing is not None:
            if existing.kind != "refund" or existing.plan.get("request_digest") != digest:
                raise Conflict(
                    "operation_conflict",
                    f"Operation {request.operation_id!r} was already used for another request",
                    field="operation_id",
                )
            return RefundResponse.model_validate(existing.response)
        purchase = _operation(session, store, request.purchase_operation_id, lock=True)
        if purchase is None or purchase.kind not in {"purchase", "offline"}:
            raise NotFound(
                "unknown_operation",
                f"No purchase {request.purchase_operation_id!r} in this store",
                field="purchase_operation_id",
            )
        if purchase.state != "confirmed":
            raise Conflict(
                "purchase_not_confirmed",
                "Only a confirmed purchase can be refunded",
                field="purchase_operation_id",
            )
        lines = {
            line.line: line
            for line in session.scalars(select(PurchaseLine).where(PurchaseLine.operation_id == purchase.id))
        }
        wanted: list[tuple[int, Decimal]] = (
            [(item.line, item.quantity) for item in request.lines]
            if request.lines
            else [(n, line.quantity - line.refunded_quantity) for n, line in lines.items()]
        )
        taken: dict[str, Decimal] = {}
        returned: dict[str, Decimal] = {}
        refunded_amount = ZERO
        out_lines: list[dict[str, Any]] = []
        refunded: list[tuple[PurchaseLine, Decimal, Decimal]] = []
        for index, (number, quantity) in enumerate(wanted):
            line = lines.get(number)
            if line is None:
                raise AppError(
                    "unknown_line", f"The purchase has no line {number}", field=f"lines.{index}.line"
                )
            left = line.quantity - line.refunded_quantity
            if quantity > left or quantity <= 0:
                raise Conflict(
                    "refund_exceeds_purchase",
                    f"Line {number}: {quantity} returned, {left} refundable",
                    field=f"lines.{index}.quantity",
                )
            share = quantity / line.quantity
            money = ((line.amount - line.discount) * share).quantize(CENT, rounding=ROUND_HALF_UP)
            refunded_amount += money
            for currency, value in (line.bonus or {}).items():
                taken[currency] = taken.get(currency, ZERO) + Decimal(value) * share
            for currency, value in (line.write_off or {}).items():
                returned[currency] = returned.get(currency, ZERO) + Decimal(value) * share
            line.refunded_quantity += quantity
            out_lines.append({"line": number, "quantity": str(quantity), "amount": str(money)})
            refunded.append((line, quantity, money))
        precision = {
            code: places for code, places in session.execute(select(Currency.code, Currency.precision))
        }

        def rounded(values: dict[str, Decimal]) -> dict[str, Decimal]:
            return {
                c: v.quantize(Decimal(1).scaleb(-precision.get(c, 2)), rounding=ROUND_HALF_UP)
                for c, v in values.items()
                if v > 0
            }

        taken, returned = rounded(taken), rounded(returned)
        purchase_key = _reservation_key(store.id, purchase.operation_id)
        refund_key = _reservation_key(store.id, request.operation_id)
        member_id = purchase.member_id
        if member_id is not None:
            for currency, amount in taken.items():
                refunds.reverse_accrual(
                    session,
                    member_id=member_id,
                    currency=currency,
                    amount=amount,
                    source="refund",
                    source_ref=refund_key,
                    original_ref=purchase_key,
                    reason=f"refund of cheque {purchase.cheque_number}",
                )
            for currency, amount in returned.items():
                refunds.return_write_off(
                    session,
                    member_id=member_id,
                    currency=currency,
                    amount=amount,
                    source="refund",
                    source_ref=refund_key,
                    original_ref=purchase_key,
                    reason=f"refund of cheque {purchase.cheque_number}",
                )
        balances = _balances(session, member_id) if member_id is not None else []
        answer = RefundResponse(
            operation_id=request.operation_id,
            purchase_operation_id=purchase.operation_id,
            store=store.code,
            amount=refunded_amount,
            lines=out_lines,
            points_taken_back=taken,
            points_returned=returned,
            balance=balances,
        )
        refund_operation = Operation(
            operation_id=request.operation_id,
            store_id=store.id,
            kind="refund",
            state="confirmed",
            member_id=member_id,
            card_id=purchase.card_id,
            purchase_id=purchase.id,
            cheque_number=purchase.cheque_number,
            cheque_at=utcnow(),
            amount=refunded_amount,
            write_off=_amounts(returned),
            accrual=_amounts(taken),
            plan={"request_digest": digest},
            response=answer.model_dump(mode="json"),
            confirmed_at=utcnow(),
        )
        session.add(refund_operation)
        session.flush()
        emit_many(
            session,
            [
                purchase_events.purchase_refunded(
                    refund_operation, purchase, refunded, store_code=store.code, channel=store.channel
                )
            ],
        )
        return answer


# ---------------------------------------------------------------- balance


def balance(db: Database, principal: Principal, identifier: Identifier, region: str) -> BalanceResponse:
    with db.transaction() as session:
        buyer = _identify(session, identifier, region)
        assert buyer is not None
        if principal.role == "client" and principal.member_id != buyer.member.id:
            raise Forbidden("forbidden", "A client key may only see its own balance")
        return BalanceResponse(member=buyer.ref(), balance=_balances(session, buyer.member.id))


# ---------------------------------------------------------------- offline cheques


def offline_cheques(db: Database, principal: Principal, batch: OfflineBatch, region: str) -> OfflineResponse:
    """Cheques a till stored while offline: accrual only, by the offers valid when they were bought."""
    results: list[OfflineResult] = []
    for index, item in enumerate(batch.cheques):
        try:
            with db.transaction() as session:
                results.append(_offline_one(session, principal, batch.store, index, item, region))
        except AppError as exc:
            results.append(
                OfflineResult(
                    index=index,
                    operation_id=item.operation_id,
                    status="rejected",
                    error=exc.to_dict()["error"],
                )
            )
        except IntegrityError:
            results.append(OfflineResult(index=index, operation_id=item.operation_id, status="duplicate"))
    return OfflineResponse(
        accepted=sum(r.status == "accepted" for r in results),
        duplicates=sum(r.status == "duplicate" for r in results),
        rejected=sum(r.status == "rejected" for r in results),
        results=results,
    )


def _offline_one(
    session: Session, principal: Principal, store_code: str | None, index: int, item: Any, region: str
) -> OfflineResult:
    store = _store(session, principal, store_code)
    existing = _operation(session, store, item.operation_id)
    if existing is not None:
        return OfflineResult(
            index=index, operation_id=item.operation_id, status="duplicate", accrued=dict(existing.accrual)
        )
    buyer = _identify(session, item.identifier, region)
    facts = _member_facts(session, buyer, _balances(session, buyer.member.id)) if buyer else None
    moment = item.cheque.created_at
    snapshot, active_then = offers.snapshot_at(session, moment)
    cheque = _engine_cheque(
        session, store, item.cheque, facts, excluded=frozenset(o.id for o in snapshot.offers) - active_then
    )
    result = engine.calculate(snapshot, cheque, discounts=False, write_off=False)
    key = _reservation_key(store.id, item.operation_id)
    accrued: dict[str, Decimal] = {}
    plan = _plan(result) if buyer else []
    if buyer is not None:
        accrued = _book_accruals(
            session, store, buyer.member.id, plan, source="offline_cheque", source_ref=key, at=moment
        )
    operation = Operation(
        operation_id=item.operation_id,
        store_id=store.id,
        kind="offline",
        state="confirmed",
        member_id=buyer.member.id if buyer else None,
        card_id=buyer.card.id if buyer and buyer.card else None,
        cheque_number=item.cheque.number,
        cheque_at=moment,
        amount=sum((line.amount for line in item.cheque.lines), ZERO),
        accrual=_amounts(accrued),
        plan={"accruals": plan, "offers": result.applied_offers},
        payments=[p.model_dump(mode="json") for p in item.cheque.payments],
        confirmed_at=utcnow(),
    )
    session.add(operation)
    session.flush()
    # Offline cheques only accrue: the till already charged full price.
    session.execute(
        insert(PurchaseLine),
        _purchase_lines(operation.id, item.cheque.lines, result.lines, with_discount=False),
    )
    offers.record_use(
        session,
        offer_ids=result.applied_offers,
        member_id=buyer.member.id if buyer else None,
        points={},
        money={},
    )
    session.flush()
    _emit_confirmed(session, operation, store, _lines_of(session, operation))
    return OfflineResult(index=index, operation_id=item.operation_id, status="accepted", accrued=accrued)
