"""Ledger use cases: currencies, accruals, write-offs, expiry, activation, reservations.

The functions taking a ``Session`` (``accrue``, ``write_off``, ``reserve``, ``confirm_reservation``,
``release_reservation``, ``expire_lots``, ``record_activations``, ``balance``) are the public
building blocks for processing: they never commit, so a caller composes several in one
transaction. When they refuse (``AppError``) the caller's transaction must roll back, which
``Database.transaction()`` does.

Concurrency: everything that changes a member's lots or reservations first locks the member's
account row (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite writers are already serialised
by ``BEGIN IMMEDIATE``), then re-reads the lots, so two write-offs can never both spend the same
points. Accruals only add lots and need no lock. Several accounts are always locked in id order.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, cast

from sqlalchemy import Table, and_, bindparam, case, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from omniloyal.auth.schemas import Principal
from omniloyal.auth.service import record_audit
from omniloyal.catalog.models import LegalEntity
from omniloyal.db import refcache
from omniloyal.db.engine import Database
from omniloyal.db.types import UTCDateTime
from omniloyal.events.outbox import emit, emit_many, envelope
from omniloyal.kernel.clock import ensure_utc, utcnow
from omniloyal.kernel.errors import AppError, Conflict, NotFound, not_found
from omniloyal.kernel.money import ZERO, quantize
from omniloyal.kernel.pagination import Page, check_limit, cut, paginate
from omniloyal.ledger.models import Account, Currency, LedgerEntry, Lot, Posting, Reservation
from omniloyal.ledger.schemas import (
    CurrencyBalance,
    CurrencyCreate,
    CurrencyOut,
    EmissionAccountOut,
    EntryOut,
    Expiry,
    LedgerRequest,
    LedgerResult,
    LotShare,
    MemberBalance,
)
from omniloyal.members.models import Member

# One operation may not move more than this (keeps every sum far from the column limits).
MAX_AMOUNT = Decimal(10) ** 12
# How many upcoming expiry moments a balance lists.
NEXT_EXPIRIES = 5


# --- small helpers -------------------------------------------------------------------------------


class CurrencyLike(Protocol):
    """What amount checks read of a currency (an ORM row or a cached pair)."""

    @property
    def code(self) -> str: ...

    @property
    def precision(self) -> int: ...


@dataclass(frozen=True, slots=True)
class CurrencyRef:
    code: str
    precision: int


def _moment(at: datetime | None, field: str = "at") -> datetime:
    return ensure_utc(at, field=field) if at is not None else utcnow()


def get_currency(session: Session, code: str, *, field: str = "currency") -> Currency:
    currency = session.get(Currency, code)
    if currency is None:
        raise not_found("currency", code, field=field)
    return currency


def currency_precision(session: Session, code: str, *, field: str = "currency") -> int:
    """Decimal places of a currency, from the reference-data cache; raises ``unknown_currency``."""
    places = refcache.cached(
        session,
        ("currency", code),
        lambda: session.scalar(select(Currency.precision).where(Currency.code == code)),
    )
    if places is None:
        raise not_found("currency", code, field=field)
    return int(places)


def check_amount(amount: Any, currency: CurrencyLike, *, field: str = "amount") -> Decimal:
    """A positive amount with no more places than the currency keeps; otherwise ``invalid_amount``."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise AppError("invalid_amount", "amount must be a Decimal (never a float)", field=field)
    value = Decimal(amount)
    if not value.is_finite() or value <= 0:
        raise AppError("invalid_amount", "amount must be greater than zero", field=field)
    if value > MAX_AMOUNT:
        raise AppError("invalid_amount", f"amount may not exceed {MAX_AMOUNT}", field=field)
    rounded = quantize(value, currency.precision)
    if rounded != value:
        raise AppError(
            "invalid_amount",
            f"{currency.code} keeps {currency.precision} decimal places; {value} has more",
            field=field,
        )
    return rounded


def _require_member(session: Session, member_id: int) -> Member:
    member = session.get(Member, member_id)
    if member is None:
        raise not_found("member", member_id, field="member_id")
    return member


def _legal_entity(session: Session, legal_entity_id: int | None) -> LegalEntity:
    if legal_entity_id is None:
        default = session.scalar(select(LegalEntity).where(LegalEntity.is_default.is_(True)))
        if default is None:
            raise Conflict(
                "no_legal_entity",
                "No legal entity named and none is marked default: someone must issue the points",
                field="legal_entity",
            )
        return default
    entity = session.get(LegalEntity, legal_entity_id)
    if entity is None:
        raise not_found("legal_entity", legal_entity_id, field="legal_entity")
    return entity


def _insert_ignoring_conflict(session: Session, values: dict[str, Any]) -> None:
    # Two first accruals may race to create the same account: the loser simply reuses the row.
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(Account).values(**values).on_conflict_do_nothing())


_MEMBER_ACCOUNT = (
    select(Account)
    .where(Account.member_id == bindparam("member_id"), Account.currency == bindparam("currency"))
    .execution_options(populate_existing=True)
)
_MEMBER_ACCOUNT_LOCKED = _MEMBER_ACCOUNT.with_for_update()


def _member_account(
    session: Session, member_id: int, currency: str, *, lock: bool, create: bool = False
) -> Account | None:
    stmt = _MEMBER_ACCOUNT_LOCKED if lock else _MEMBER_ACCOUNT
    params = {"member_id": member_id, "currency": currency}
    account = session.scalar(stmt, params)
    if account is None and create:
        _insert_ignoring_conflict(
            session, {"kind": "member", "member_id": member_id, "currency": currency, "created_at": utcnow()}
        )
        account = session.scalar(stmt, params)
    return account


def _emission_account(session: Session, legal_entity_id: int, currency: str) -> Account:
    stmt = select(Account).where(Account.legal_entity_id == legal_entity_id, Account.currency == currency)
    account = session.scalar(stmt)
    if account is None:
        _insert_ignoring_conflict(
            session,
            {
                "kind": "emission",
                "legal_entity_id": legal_entity_id,
                "currency": currency,
                "created_at": utcnow(),
            },
        )
        account = session.scalar(stmt)
    assert account is not None
    return account


def _lock_accounts(session: Session, account_ids: Iterable[int]) -> list[Account]:
    """Locks accounts in id order (a fixed order, so two lockers never deadlock)."""
    ids = sorted(set(account_ids))
    if not ids:
        return []
    stmt = (
        select(Account)
        .where(Account.id.in_(ids))
        .order_by(Account.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(stmt).all())


# The ledger entries the event stream carries (one event per entry, in the entry's transaction).
_ENTRY_EVENTS = {"accrual": "points.accrued", "write_off": "points.written_off", "expiry": "points.expired"}


def _entry(
    session: Session,
    *,
    kind: str,
    member_id: int | None,
    currency: str,
    amount: Decimal,
    source: str,
    source_ref: str | None,
    reason: str | None,
    actor: str | None,
    at: datetime,
    legal_entity_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> LedgerEntry:
    entry = LedgerEntry(
        kind=kind,
        member_id=member_id,
        currency=currency,
        amount=amount,
        source=source,
        source_ref=source_ref,
        reason=reason,
        actor=actor,
        legal_entity_id=legal_entity_id,
        details=details or {},
        created_at=at,
    )
    session.add(entry)
    session.flush()
    event_type = _ENTRY_EVENTS.get(kind)
    if event_type is not None and member_id is not None:
        emit(
            session,
            f"{event_type}:{entry.id}",
            event_type,
            member_id=member_id,
            occurred_at=at,
            properties={
                "currency": currency,
                "amount": f"{abs(amount):f}",
                "entry": entry.id,
                "source": source,
                "source_ref": source_ref,
                "reason": reason,
            },
        )
    return entry


def _post(session: Session, entry: LedgerEntry, account_id: int, lot_id: int | None, amount: Decimal) -> None:
    session.add(
        Posting(
            entry_id=entry.id,
            account_id=account_id,
            lot_id=lot_id,
            amount=amount,
            created_at=entry.created_at,
        )
    )


def _is_active(lot: Lot, now: datetime) -> bool:
    return lot.activates_at <= now and (lot.expires_at is None or lot.expires_at > now)


def _active_lots(session: Session, account_id: int, now: datetime) -> list[Lot]:
    """Spendable lots in the order they are spent: soonest expiry first, never-expiring last, oldest first."""
    return list(session.scalars(_ACTIVE_LOTS, {"account_id": account_id, "now": now}).all())


def _debts(session: Session, account_id: int) -> list[Lot]:
    """Open lots with a negative remainder: points a refund took back after they were spent.

    ``ledger.refunds`` creates them; the next accruals pay them off (oldest first), and until
    then they count against what the member may spend.
    """
    stmt = (
        select(Lot)
        .where(Lot.account_id == account_id, Lot.closed_at.is_(None), Lot.remaining < ZERO)
        .order_by(Lot.id)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(stmt).all())


def _held_reservations(
    session: Session, account_ids: Sequence[int], now: datetime, *, excluding: int | None = None
) -> list[Reservation]:
    if not account_ids:
        return []
    stmt = select(Reservation).where(
        Reservation.account_id.in_(account_ids),
        Reservation.state == "held",
        or_(Reservation.expires_at.is_(None), Reservation.expires_at > now),
    )
    if excluding is not None:
        stmt = stmt.where(Reservation.id != excluding)
    return list(session.scalars(stmt.execution_options(populate_existing=True)).all())


# Aggregates the till reads instead of loading every open lot and hold as an object (a member
# with a year of purchases has hundreds of lots). Prebuilt once: only parameters change.
_NOW = bindparam("now", type_=UTCDateTime())
_ACTIVE = and_(Lot.activates_at <= _NOW, or_(Lot.expires_at.is_(None), Lot.expires_at > _NOW))
_HELD = and_(
    Reservation.state == "held", or_(Reservation.expires_at.is_(None), Reservation.expires_at > _NOW)
)
_BALANCE_COLUMNS = (
    Account.currency,
    Currency.precision,
    func.sum(case((_ACTIVE, Lot.remaining), else_=None)),
    func.sum(case((Lot.activates_at > _NOW, Lot.remaining), else_=None)),
    select(func.sum(Reservation.amount)).where(Reservation.account_id == Account.id, _HELD).scalar_subquery(),
)
_BALANCE_LOTS = and_(Lot.account_id == Account.id, Lot.closed_at.is_(None), Lot.remaining != ZERO)
_BALANCES = (
    select(*_BALANCE_COLUMNS)
    .join(Currency, Currency.code == Account.currency)
    .outerjoin(Lot, _BALANCE_LOTS)
    .where(Account.member_id == bindparam("member_id"))
    .group_by(Account.id, Account.currency, Currency.precision)
    .order_by(Account.currency)
)
# The same for many members at once (the warehouse mirror of balances).
_MEMBERS_BALANCES = (
    select(Account.member_id, *_BALANCE_COLUMNS)
    .join(Currency, Currency.code == Account.currency)
    .outerjoin(Lot, _BALANCE_LOTS)
    .where(Account.member_id.in_(bindparam("member_ids", expanding=True)))
    .group_by(Account.id, Account.member_id, Account.currency, Currency.precision)
    .order_by(Account.member_id, Account.currency)
)
# What one account may spend now: active positive lots plus debts (negative), minus holds.
_SPENDABLE = select(
    select(func.sum(Lot.remaining))
    .where(
        Lot.account_id == bindparam("account_id"),
        Lot.closed_at.is_(None),
        or_(and_(Lot.remaining > ZERO, _ACTIVE), Lot.remaining < ZERO),
    )
    .scalar_subquery(),
    select(func.sum(Reservation.amount))
    .where(
        Reservation.account_id == bindparam("account_id"),
        _HELD,
        Reservation.id != bindparam("excluding"),
    )
    .scalar_subquery(),
)


_ACTIVE_LOTS = (
    select(Lot)
    .where(Lot.account_id == bindparam("account_id"), Lot.closed_at.is_(None), Lot.remaining > ZERO, _ACTIVE)
    .order_by(Lot.expires_at.is_(None), Lot.expires_at, Lot.accrued_at, Lot.id)
    .execution_options(populate_existing=True)
)


@dataclass(frozen=True, slots=True)
class Spendable:
    """A member's points in one currency as a till shows them."""

    currency: str
    available: Decimal
    pending: Decimal
    reserved: Decimal


def _spendable(
    currency: str, places: int, active: Decimal | None, pending: Decimal | None, held: Decimal | None
) -> Spendable:
    active = active or ZERO
    reserved = min(held or ZERO, max(active, ZERO))
    return Spendable(
        currency,
        quantize(active - reserved, places),
        quantize(pending or ZERO, places),
        quantize(reserved, places),
    )


def spendable_balances(session: Session, member_id: int, now: datetime) -> list[Spendable]:
    """``balance`` without expiry details: one statement, no lot loaded (the till's read)."""
    return [_spendable(*row) for row in session.execute(_BALANCES, {"member_id": member_id, "now": now})]


def members_balances(
    db: Database, member_ids: Iterable[int], now: datetime | None = None
) -> dict[int, list[Spendable]]:
    """``spendable_balances`` of many members in one statement per 500 (members without an
    account are absent)."""
    moment = _moment(now, "now")
    ids = sorted(set(member_ids))
    result: dict[int, list[Spendable]] = {}
    with db.reading() as session:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for member_id, *row in session.execute(_MEMBERS_BALANCES, {"member_ids": chunk, "now": moment}):
                result.setdefault(member_id, []).append(_spendable(*row))
    return result


def _spendable_now(
    session: Session, account_id: int, now: datetime, *, excluding: int | None = None
) -> Decimal:
    """Spendable now: active lots plus debts minus holds. Never below zero here: held points can
    outlive the lots behind them (a lot expired while reserved), and a debt only means nothing
    can be spent."""
    owned, held = session.execute(
        _SPENDABLE, {"account_id": account_id, "now": now, "excluding": excluding or 0}
    ).one()
    return max((owned or ZERO) - (held or ZERO), ZERO)


def _insufficient(currency: CurrencyLike, available: Decimal, requested: Decimal) -> Conflict:
    available = quantize(available, currency.precision)
    return Conflict(
        "insufficient_points",
        f"Only {available} {currency.code} available, {requested} requested",
        field="amount",
        details={
            "available": format(available, "f"),
            "requested": format(requested, "f"),
            "currency": currency.code,
        },
    )


# --- accrual, write-off --------------------------------------------------------------------------


def _check_terms(activation_delay: timedelta, lifetime: timedelta | None) -> None:
    if activation_delay < timedelta(0):
        raise AppError(
            "invalid_activation_delay", "activation delay may not be negative", field="activation_delay_days"
        )
    if lifetime is not None and lifetime <= timedelta(0):
        raise AppError(
            "invalid_lifetime", "lifetime must be positive (or absent: never expires)", field="lifetime_days"
        )


def accrue(
    session: Session,
    *,
    member_id: int,
    currency: str,
    amount: Decimal,
    legal_entity_id: int | None = None,
    source: str,
    source_ref: str | None = None,
    reason: str | None = None,
    actor: str | None = None,
    at: datetime | None = None,
    activation_delay: timedelta = timedelta(0),
    lifetime: timedelta | None = None,
) -> LedgerEntry:
    """Issues points to a member: one lot, the legal entity's emission account pays (-x, member +x)."""
    now = _moment(at)
    cur = get_currency(session, currency)
    value = check_amount(amount, cur)
    _check_terms(activation_delay, lifetime)
    _require_member(session, member_id)
    entity = _legal_entity(session, legal_entity_id)
    # Locked because an accrual may pay off a debt (a lot left negative by a refund).
    account = _member_account(session, member_id, cur.code, lock=True, create=True)
    assert account is not None
    emission = _emission_account(session, entity.id, cur.code)
    entry = _entry(
        session,
        kind="accrual",
        member_id=member_id,
        currency=cur.code,
        amount=value,
        source=source,
        source_ref=source_ref,
        reason=reason,
        actor=actor,
        at=now,
        legal_entity_id=entity.id,
    )
    left = value
    for debt in _debts(session, account.id):
        if left <= 0:
            break
        paid = min(-debt.remaining, left)
        debt.remaining += paid
        if debt.remaining == 0:
            debt.closed_at = now
        _post(session, entry, emission.id, debt.id, -paid)
        _post(session, entry, account.id, debt.id, paid)
        left -= paid
    if left > 0:
        activates_at = now + activation_delay
        lot = Lot(
            account_id=account.id,
            amount=left,
            remaining=left,
            accrued_at=now,
            activates_at=activates_at,
            expires_at=activates_at + lifetime if lifetime is not None else None,
            entry_id=entry.id,
            legal_entity_id=entity.id,
            source=source,
            # Points usable at once need no separate "activation" line in the history.
            activation_recorded=activation_delay == timedelta(0),
        )
        session.add(lot)
        session.flush()
        _post(session, entry, emission.id, lot.id, -left)
        _post(session, entry, account.id, lot.id, left)
    session.flush()
    return entry


@dataclass(frozen=True, slots=True)
class LotPlan:
    """One lot a purchase earns (the processing plan groups accruals by offer and terms)."""

    currency: str
    amount: Decimal
    legal_entity_id: int
    reason: str | None = None
    activation_delay: timedelta = timedelta(0)
    lifetime: timedelta | None = None


_ENTRIES = cast(Table, LedgerEntry.__table__)
_LOTS = cast(Table, Lot.__table__)
_POSTINGS = cast(Table, Posting.__table__)
_HAS_DEBT = (
    exists()
    .where(Lot.account_id == Account.id, Lot.closed_at.is_(None), Lot.remaining < ZERO)
    .correlate(Account)
)
_ACCOUNT_AND_DEBT = select(Account.id, _HAS_DEBT).where(
    Account.member_id == bindparam("member_id"), Account.currency == bindparam("currency")
)
_EMISSION_ID = select(Account.id).where(
    Account.legal_entity_id == bindparam("legal_entity_id"), Account.currency == bindparam("currency")
)


def _emission_id(session: Session, legal_entity_id: int, currency: str) -> int:
    """The emission account of a legal entity, created on first use. Ids of accounts that already
    exist are cached (they are never deleted); one created in this transaction is not, as the
    transaction may still roll back."""
    key = ("emission", legal_entity_id, currency)
    hit = refcache.peek(session, key)
    if hit is not refcache.MISSING:
        return int(hit)
    params = {"legal_entity_id": legal_entity_id, "currency": currency}
    found = session.scalar(_EMISSION_ID, params)
    if found is None:
        return _emission_account(session, legal_entity_id, currency).id
    refcache.fill(session, [key], lambda: {key: found})
    return int(found)


def _account_for_accrual(session: Session, member_id: int, currency: str) -> tuple[int, bool]:
    """The member's account id (created if new, locked on PostgreSQL) and whether it has debts."""
    stmt = _ACCOUNT_AND_DEBT
    if session.get_bind().dialect.name != "sqlite":  # SQLite: BEGIN IMMEDIATE already serialises writers
        stmt = stmt.with_for_update(of=Account)
    params = {"member_id": member_id, "currency": currency}
    row = session.execute(stmt, params).first()
    if row is None:
        _insert_ignoring_conflict(
            session, {"kind": "member", "member_id": member_id, "currency": currency, "created_at": utcnow()}
        )
        row = session.execute(stmt, params).one()
    return int(row[0]), bool(row[1])


def accrue_lots(
    session: Session,
    *,
    member_id: int,
    plans: Sequence[LotPlan],
    source: str,
    source_ref: str | None,
    at: datetime,
) -> dict[str, Decimal]:
    """Several accruals of one operation in a handful of statements: the same entries, lots,
    postings and ``points.accrued`` events as ``accrue`` once per plan. Returns the total per
    currency. An account with a debt takes the one-by-one path, which pays the debt first."""
    now = ensure_utc(at, field="at")
    checked: list[tuple[LotPlan, Decimal]] = []
    for plan in plans:
        places = currency_precision(session, plan.currency)
        value = check_amount(plan.amount, CurrencyRef(plan.currency, places))
        _check_terms(plan.activation_delay, plan.lifetime)
        checked.append((plan, value))
    if not checked:
        return {}
    accounts: dict[str, int] = {}
    for currency in dict.fromkeys(plan.currency for plan, _ in checked):
        account_id, in_debt = _account_for_accrual(session, member_id, currency)
        if in_debt:
            return _accrue_one_by_one(session, member_id, checked, source, source_ref, now)
        accounts[currency] = account_id
    connection = session.connection()
    entry_ids = (
        connection.execute(
            _ENTRIES.insert().returning(_ENTRIES.c.id, sort_by_parameter_order=True),
            [
                {
                    "kind": "accrual",
                    "member_id": member_id,
                    "currency": plan.currency,
                    "amount": value,
                    "source": source,
                    "source_ref": source_ref,
                    "reason": plan.reason,
                    "actor": None,
                    "legal_entity_id": plan.legal_entity_id,
                    "details": {},
                    "created_at": now,
                }
                for plan, value in checked
            ],
        )
        .scalars()
        .all()
    )
    lot_ids = (
        connection.execute(
            _LOTS.insert().returning(_LOTS.c.id, sort_by_parameter_order=True),
            [
                {
                    "account_id": accounts[plan.currency],
                    "amount": value,
                    "remaining": value,
                    "accrued_at": now,
                    "activates_at": now + plan.activation_delay,
                    "expires_at": now + plan.activation_delay + plan.lifetime
                    if plan.lifetime is not None
                    else None,
                    "entry_id": entry_id,
                    "legal_entity_id": plan.legal_entity_id,
                    "source": source,
                    "closed_at": None,
                    # Points usable at once need no separate "activation" line in the history.
                    "activation_recorded": plan.activation_delay == timedelta(0),
                }
                for (plan, value), entry_id in zip(checked, entry_ids, strict=True)
            ],
        )
        .scalars()
        .all()
    )
    postings = []
    totals: dict[str, Decimal] = {}
    for (plan, value), entry_id, lot_id in zip(checked, entry_ids, lot_ids, strict=True):
        emission = _emission_id(session, plan.legal_entity_id, plan.currency)
        postings.append(
            {
                "entry_id": entry_id,
                "account_id": emission,
                "lot_id": lot_id,
                "amount": -value,
                "created_at": now,
            }
        )
        postings.append(
            {
                "entry_id": entry_id,
                "account_id": accounts[plan.currency],
                "lot_id": lot_id,
                "amount": value,
                "created_at": now,
            }
        )
        totals[plan.currency] = totals.get(plan.currency, ZERO) + value
    connection.execute(_POSTINGS.insert(), postings)
    emit_many(
        session,
        [
            envelope(
                f"points.accrued:{entry_id}",
                "points.accrued",
                member_id=member_id,
                occurred_at=now,
                properties={
                    "currency": plan.currency,
                    "amount": f"{value:f}",
                    "entry": entry_id,
                    "source": source,
                    "source_ref": source_ref,
                    "reason": plan.reason,
                },
            )
            for (plan, value), entry_id in zip(checked, entry_ids, strict=True)
        ],
    )
    return totals


def _accrue_one_by_one(
    session: Session,
    member_id: int,
    checked: list[tuple[LotPlan, Decimal]],
    source: str,
    source_ref: str | None,
    now: datetime,
) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for plan, value in checked:
        accrue(
            session,
            member_id=member_id,
            currency=plan.currency,
            amount=value,
            legal_entity_id=plan.legal_entity_id,
            source=source,
            source_ref=source_ref,
            reason=plan.reason,
            at=now,
            activation_delay=plan.activation_delay,
            lifetime=plan.lifetime,
        )
        totals[plan.currency] = totals.get(plan.currency, ZERO) + value
    return totals


def _spend(
    session: Session,
    *,
    account: Account | None,
    member_id: int,
    cur: CurrencyLike,
    amount: Decimal,
    source: str,
    source_ref: str | None,
    reason: str | None,
    actor: str | None,
    now: datetime,
    reservation: Reservation | None = None,
) -> LedgerEntry:
    """Write-off on a locked account; ``reservation`` (being confirmed) does not count as held."""
    lots = _active_lots(session, account.id, now) if account is not None else []
    available = (
        _spendable_now(session, account.id, now, excluding=reservation.id if reservation else None)
        if account is not None
        else ZERO
    )
    if amount > available:
        raise _insufficient(cur, available, amount)
    assert account is not None  # amount > 0 and nothing available without an account
    if reservation is not None:
        reservation.state = "confirmed"
    # Which lots pay, first: the entry then names the legal entity when a single one issued them.
    taken: list[tuple[Lot, Decimal]] = []
    left = amount
    for lot in lots:
        if left <= 0:
            break
        take = min(lot.remaining, left)
        taken.append((lot, take))
        left -= take
    entities = {lot.legal_entity_id for lot, _ in taken}
    entry = _entry(
        session,
        kind="write_off",
        member_id=member_id,
        currency=cur.code,
        amount=-amount,
        source=source,
        source_ref=source_ref,
        reason=reason,
        actor=actor,
        at=now,
        legal_entity_id=next(iter(entities)) if len(entities) == 1 else None,
    )
    postings = []
    for lot, take in taken:
        lot.remaining -= take
        if lot.remaining == 0:
            lot.closed_at = now
        # Points go back to the legal entity that issued the lot.
        emission = _emission_id(session, lot.legal_entity_id, cur.code)
        postings.append(
            {
                "entry_id": entry.id,
                "account_id": account.id,
                "lot_id": lot.id,
                "amount": -take,
                "created_at": now,
            }
        )
        postings.append(
            {
                "entry_id": entry.id,
                "account_id": emission,
                "lot_id": lot.id,
                "amount": take,
                "created_at": now,
            }
        )
    if postings:
        session.connection().execute(_POSTINGS.insert(), postings)
    if reservation is not None:
        reservation.entry_id = entry.id
    session.flush()
    return entry


def write_off(
    session: Session,
    *,
    member_id: int,
    currency: str,
    amount: Decimal,
    source: str,
    source_ref: str | None = None,
    reason: str | None = None,
    actor: str | None = None,
    at: datetime | None = None,
) -> LedgerEntry:
    """Spends active lots, soonest-expiring first; refuses more than available (``insufficient_points``)."""
    now = _moment(at)
    cur = get_currency(session, currency)
    value = check_amount(amount, cur)
    _require_member(session, member_id)
    account = _member_account(session, member_id, cur.code, lock=True)
    return _spend(
        session,
        account=account,
        member_id=member_id,
        cur=cur,
        amount=value,
        source=source,
        source_ref=source_ref,
        reason=reason,
        actor=actor,
        now=now,
    )


# --- jobs ----------------------------------------------------------------------------------------


def _expired_condition(now: datetime) -> Any:
    return (Lot.expires_at <= now, Lot.closed_at.is_(None), Lot.remaining > ZERO)


def expire_lots(session: Session, now: datetime) -> int:
    """Burns the remainder of every lot whose ``expires_at`` passed: one ``expiry`` entry per lot."""
    now = ensure_utc(now, field="now")
    account_ids = session.scalars(select(Lot.account_id).where(*_expired_condition(now)).distinct()).all()
    burnt = 0
    for account in _lock_accounts(session, account_ids):
        lots = session.scalars(
            select(Lot)
            .where(Lot.account_id == account.id, *_expired_condition(now))
            .order_by(Lot.expires_at, Lot.id)
            .execution_options(populate_existing=True)
        ).all()
        for lot in lots:
            value = lot.remaining
            entry = _entry(
                session,
                kind="expiry",
                member_id=account.member_id,
                currency=account.currency,
                amount=-value,
                source="expiry_job",
                source_ref=None,
                reason="points expired",
                actor=None,
                at=now,
                legal_entity_id=lot.legal_entity_id,
                details={"lot_id": lot.id},
            )
            emission = _emission_account(session, lot.legal_entity_id, account.currency)
            _post(session, entry, account.id, lot.id, -value)
            _post(session, entry, emission.id, lot.id, value)
            lot.remaining = ZERO
            lot.closed_at = now
            burnt += 1
    session.flush()
    return burnt


def record_activations(session: Session, now: datetime) -> int:
    """Writes an ``activation`` history entry (no postings) for each delayed lot that became spendable."""
    now = ensure_utc(now, field="now")
    lots = session.scalars(
        select(Lot)
        .where(Lot.activation_recorded.is_(False), Lot.activates_at <= now)
        .order_by(Lot.activates_at, Lot.id)
        # Two job runners never record the same lot; a lot being spent is picked up next round.
        .with_for_update(skip_locked=True)
    ).all()
    if not lots:
        return 0
    accounts = {
        a.id: a
        for a in session.scalars(select(Account).where(Account.id.in_({lot.account_id for lot in lots})))
    }
    for lot in lots:
        account = accounts[lot.account_id]
        _entry(
            session,
            kind="activation",
            member_id=account.member_id,
            currency=account.currency,
            amount=lot.amount,
            source="activation_job",
            source_ref=None,
            reason="points became available",
            actor=None,
            at=now,
            legal_entity_id=lot.legal_entity_id,
            details={"lot_id": lot.id},
        )
        lot.activation_recorded = True
    session.flush()
    return len(lots)


def release_expired_reservations(session: Session, now: datetime) -> int:
    """Releases holds whose time ran out (they already stopped counting; this tidies their state).

    One conditional UPDATE, no account locks: a hold confirmed meanwhile no longer matches
    ``state = 'held'`` when PostgreSQL re-checks the row, so it is left alone.
    """
    now = ensure_utc(now, field="now")
    result = session.execute(
        update(Reservation)
        .where(Reservation.state == "held", Reservation.expires_at <= now)
        .values(state="released")
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class JobResult:
    activations: int
    expired_lots: int
    released_reservations: int


def run_jobs(db: Database, now: datetime | None = None) -> JobResult:
    """Periodic ledger work, in one transaction: burn expired lots, record activations, release stale holds.

    Expiry goes first: it is the only step that waits for locks (member accounts, in id order,
    like a write-off); the later steps never wait (lots being spent are skipped until next round),
    so the job cannot deadlock with a write-off.
    """
    moment = _moment(now, "now")
    with db.transaction() as session:
        expired = expire_lots(session, moment)
        activations = record_activations(session, moment)
        released = release_expired_reservations(session, moment)
    return JobResult(activations, expired, released)


# --- balance -------------------------------------------------------------------------------------


def balance(
    session: Session, member_id: int, now: datetime | None = None, *, currency: str | None = None
) -> list[CurrencyBalance]:
    """The member's points per currency (one item per account the member has), at ``now``."""
    moment = _moment(now, "now")
    _require_member(session, member_id)
    stmt = select(Account, Currency.precision).join(Currency, Currency.code == Account.currency)
    stmt = stmt.where(Account.member_id == member_id).order_by(Account.currency)
    if currency is not None:
        stmt = stmt.where(Account.currency == get_currency(session, currency).code)
    accounts = list(session.execute(stmt).all())
    ids = [account.id for account, _ in accounts]
    lots_by_account: dict[int, list[Lot]] = defaultdict(list)
    if ids:
        open_lots = session.scalars(
            # Negative lots are debts (see _debts): they lower what is available, possibly below zero.
            select(Lot).where(Lot.account_id.in_(ids), Lot.closed_at.is_(None), Lot.remaining != ZERO)
        ).all()
        for lot in open_lots:
            lots_by_account[lot.account_id].append(lot)
    held_by_account: dict[int, Decimal] = defaultdict(lambda: ZERO)
    for reservation in _held_reservations(session, ids, moment):
        held_by_account[reservation.account_id] += reservation.amount
    result = []
    for account, places in accounts:
        lots = lots_by_account[account.id]
        active = sum((lot.remaining for lot in lots if _is_active(lot, moment)), ZERO)
        pending = sum((lot.remaining for lot in lots if lot.activates_at > moment), ZERO)
        reserved = min(held_by_account[account.id], max(active, ZERO))
        expiries: dict[datetime, Decimal] = defaultdict(lambda: ZERO)
        for lot in lots:
            if lot.expires_at is not None and lot.expires_at > moment:
                expiries[lot.expires_at] += lot.remaining
        result.append(
            CurrencyBalance(
                currency=account.currency,
                available=quantize(active - reserved, places),
                pending=quantize(pending, places),
                reserved=quantize(reserved, places),
                total=quantize(active + pending, places),
                next_expiries=[
                    Expiry(at=at, amount=quantize(expiries[at], places))
                    for at in sorted(expiries)[:NEXT_EXPIRIES]
                ],
            )
        )
    return result


# --- reservations --------------------------------------------------------------------------------


_HOLDING = select(Reservation.id).where(
    Reservation.account_id == bindparam("account_id"),
    Reservation.operation_id == bindparam("operation_id"),
    Reservation.state != "released",
)
_RESERVATIONS_OF = (
    select(Reservation)
    .where(Reservation.operation_id == bindparam("operation_id"))
    .order_by(Reservation.id)
    .execution_options(populate_existing=True)
)


def reserve(
    session: Session,
    *,
    member_id: int,
    currency: str,
    amount: Decimal,
    operation_id: str,
    at: datetime | None = None,
    ttl: timedelta | None = None,
) -> Reservation:
    """Holds points for an unconfirmed operation; refuses beyond available (``insufficient_points``)."""
    now = _moment(at)
    cur = CurrencyRef(currency, currency_precision(session, currency))
    value = check_amount(amount, cur)
    if not operation_id:
        raise AppError("invalid_operation_id", "operation_id is required", field="operation_id")
    if ttl is not None and ttl <= timedelta(0):
        raise AppError("invalid_ttl", "a reservation's ttl must be positive", field="ttl")
    _require_member(session, member_id)
    account = _member_account(session, member_id, cur.code, lock=True)
    if account is None:
        raise _insufficient(cur, ZERO, value)
    existing = session.scalar(_HOLDING, {"account_id": account.id, "operation_id": operation_id})
    if existing is not None:
        raise Conflict(
            "duplicate_reservation",
            f"Operation {operation_id!r} already holds {cur.code} for this member",
            field="operation_id",
        )
    available = _spendable_now(session, account.id, now)
    if value > available:
        raise _insufficient(cur, available, value)
    reservation = Reservation(
        account_id=account.id,
        amount=value,
        operation_id=operation_id,
        state="held",
        created_at=now,
        expires_at=now + ttl if ttl is not None else None,
    )
    session.add(reservation)
    session.flush()
    return reservation


def _reservations_locked(session: Session, operation_id: str) -> list[Reservation]:
    if session.get_bind().dialect.name != "sqlite":  # SQLite: BEGIN IMMEDIATE already serialises writers
        account_ids = session.scalars(
            select(Reservation.account_id).where(Reservation.operation_id == operation_id).distinct()
        ).all()
        _lock_accounts(session, account_ids)
    held = list(session.scalars(_RESERVATIONS_OF, {"operation_id": operation_id}).all())
    if not held:
        raise NotFound(
            "unknown_reservation", f"No reservation for operation {operation_id!r}", field="operation_id"
        )
    return held


def confirm_reservation(
    session: Session,
    operation_id: str,
    *,
    source: str,
    reason: str | None = None,
    actor: str | None = None,
    at: datetime | None = None,
) -> list[LedgerEntry]:
    """Spends what ``operation_id`` holds: one write-off per currency held.

    Repeating a confirm returns the same entries and spends nothing more. A released or
    timed-out hold is refused (``reservation_released``, ``reservation_expired``).
    """
    now = _moment(at)
    entries: list[LedgerEntry] = []
    for reservation in _reservations_locked(session, operation_id):
        if reservation.state == "confirmed":
            done = session.get(LedgerEntry, reservation.entry_id) if reservation.entry_id else None
            if done is not None:
                entries.append(done)
            continue
        if reservation.state == "released":
            raise Conflict(
                "reservation_released", f"Operation {operation_id!r} was released", field="operation_id"
            )
        if reservation.expires_at is not None and reservation.expires_at <= now:
            raise Conflict(
                "reservation_expired",
                f"The hold of operation {operation_id!r} timed out",
                field="operation_id",
            )
        account = session.get(Account, reservation.account_id)
        assert account is not None and account.member_id is not None
        entries.append(
            _spend(
                session,
                account=account,
                member_id=account.member_id,
                cur=CurrencyRef(account.currency, currency_precision(session, account.currency)),
                amount=reservation.amount,
                source=source,
                source_ref=operation_id,
                reason=reason,
                actor=actor,
                now=now,
                reservation=reservation,
            )
        )
    return entries


def release_reservation(session: Session, operation_id: str) -> None:
    """Gives back what ``operation_id`` holds; releasing twice is harmless, a confirmed hold is refused."""
    reservations = _reservations_locked(session, operation_id)
    if any(r.state == "confirmed" for r in reservations):
        raise Conflict(
            "reservation_confirmed", f"Operation {operation_id!r} is already confirmed", field="operation_id"
        )
    for reservation in reservations:
        reservation.state = "released"
    session.flush()


# --- API use cases -------------------------------------------------------------------------------


def _currency_out(currency: Currency) -> CurrencyOut:
    return CurrencyOut(
        code=currency.code, name=currency.name, precision=currency.precision, created_at=currency.created_at
    )


def create_currency(db: Database, data: CurrencyCreate, actor: Principal) -> CurrencyOut:
    with db.transaction() as session:
        if session.get(Currency, data.code) is not None:
            raise Conflict("duplicate_currency", f"Currency {data.code!r} already exists", field="code")
        currency = Currency(code=data.code, name=data.name, precision=data.precision, created_at=utcnow())
        session.add(currency)
        session.flush()
        out = _currency_out(currency)
        record_audit(session, actor, "create", "currency", currency.code, None, out.model_dump(mode="json"))
        return out


def _encode_code_cursor(code: str) -> str:
    return base64.urlsafe_b64encode(f"code:{code}".encode()).decode().rstrip("=")


def _decode_code_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode((cursor + "=" * (-len(cursor) % 4)).encode()).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise AppError(
            "invalid_cursor", f"Cursor {cursor!r} is not one this API returned", field="cursor"
        ) from exc
    prefix, _, code = text.partition(":")
    if prefix != "code" or not code:
        raise AppError("invalid_cursor", f"Cursor {cursor!r} is not one this API returned", field="cursor")
    return code


def list_currencies(db: Database, limit: int, cursor: str | None) -> Page[CurrencyOut]:
    limit = check_limit(limit)
    with db.reading() as session:
        stmt = select(Currency).order_by(Currency.code).limit(limit + 1)
        if cursor:
            stmt = stmt.where(Currency.code > _decode_code_cursor(cursor))
        rows = list(session.scalars(stmt).all())
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = _encode_code_cursor(rows[-1].code)
        return Page[CurrencyOut](items=[_currency_out(c) for c in rows], next_cursor=next_cursor)


def emission_accounts(
    db: Database, legal_entity: str, limit: int, cursor: str | None
) -> Page[EmissionAccountOut]:
    with db.reading() as session:
        entity = session.scalar(select(LegalEntity).where(LegalEntity.code == legal_entity))
        if entity is None:
            raise not_found("legal_entity", legal_entity)
        stmt, limit = paginate(
            select(Account, Currency.precision)
            .join(Currency, Currency.code == Account.currency)
            .where(Account.legal_entity_id == entity.id, Account.kind == "emission"),
            Account.id,
            limit,
            cursor,
        )
        rows, next_cursor = cut(list(session.execute(stmt).all()), limit, lambda row: row[0].id)
        sums: dict[int, Decimal] = {}
        if rows:
            sums = {
                account_id: total
                for account_id, total in session.execute(
                    select(Posting.account_id, func.sum(Posting.amount))
                    .where(Posting.account_id.in_([account.id for account, _ in rows]))
                    .group_by(Posting.account_id)
                ).all()
            }
        return Page[EmissionAccountOut](
            items=[
                EmissionAccountOut(
                    id=account.id,
                    legal_entity=entity.code,
                    currency=account.currency,
                    balance=quantize(sums.get(account.id, ZERO), places),
                    created_at=account.created_at,
                )
                for account, places in rows
            ],
            next_cursor=next_cursor,
        )


def _entries_out(session: Session, entries: Sequence[LedgerEntry]) -> list[EntryOut]:
    """History items with the lots each entry touched, in a few queries for the whole page."""
    if not entries:
        return []
    entry_ids = [e.id for e in entries]
    member_accounts = select(Account.id).where(Account.kind == "member")
    shares: dict[int, list[tuple[int, Decimal]]] = defaultdict(list)
    for entry_id, lot_id, amount in session.execute(
        select(Posting.entry_id, Posting.lot_id, Posting.amount)
        .where(
            Posting.entry_id.in_(entry_ids),
            Posting.lot_id.is_not(None),
            Posting.account_id.in_(member_accounts),
        )
        .order_by(Posting.id)
    ).all():
        if lot_id is not None:
            shares[entry_id].append((lot_id, amount))
    for e in entries:
        if e.kind == "activation" and "lot_id" in e.details:
            shares[e.id].append((int(e.details["lot_id"]), e.amount))
    lot_ids = {lot_id for items in shares.values() for lot_id, _ in items}
    lots = {lot.id: lot for lot in session.scalars(select(Lot).where(Lot.id.in_(lot_ids)))} if lot_ids else {}
    entity_ids = {e.legal_entity_id for e in entries if e.legal_entity_id is not None}
    entity_codes = (
        dict(
            session.execute(
                select(LegalEntity.id, LegalEntity.code).where(LegalEntity.id.in_(entity_ids))
            ).all()
        )
        if entity_ids
        else {}
    )
    precision = dict(session.execute(select(Currency.code, Currency.precision)).all())
    out = []
    for e in entries:
        places = precision.get(e.currency, 2)
        lot_shares = [
            LotShare(
                lot_id=lot_id,
                amount=quantize(amount, places),
                accrued_at=lots[lot_id].accrued_at,
                activates_at=lots[lot_id].activates_at,
                expires_at=lots[lot_id].expires_at,
            )
            for lot_id, amount in shares[e.id]
            if lot_id in lots
        ]
        single = lot_shares[0] if len(lot_shares) == 1 else None
        out.append(
            EntryOut(
                id=e.id,
                kind=e.kind,
                amount=quantize(e.amount, places),
                currency=e.currency,
                reason=e.reason,
                source=e.source,
                source_ref=e.source_ref,
                actor=e.actor,
                legal_entity=entity_codes.get(e.legal_entity_id) if e.legal_entity_id else None,
                created_at=e.created_at,
                activates_at=single.activates_at if single else None,
                expires_at=single.expires_at if single else None,
                lots=lot_shares,
            )
        )
    return out


def _actor_name(actor: Principal) -> str:
    return f"{actor.role}:{actor.name}"


def post_manual(
    db: Database, member_id: int, data: LedgerRequest, actor: Principal, default_currency: str
) -> LedgerResult:
    """A manual accrual or write-off by an operator, audited."""
    currency = data.currency or default_currency
    if data.kind == "write_off":
        for field in ("lifetime_days", "activation_delay_days", "legal_entity"):
            if getattr(data, field) is not None:
                raise AppError("accrual_only", f"{field} applies to accruals only", field=field)
    if data.lifetime_days is not None and data.lifetime_days <= 0:
        raise AppError("invalid_lifetime", "lifetime_days must be at least 1", field="lifetime_days")
    if data.activation_delay_days is not None and data.activation_delay_days < 0:
        raise AppError(
            "invalid_activation_delay",
            "activation_delay_days may not be negative",
            field="activation_delay_days",
        )
    now = utcnow()
    with db.transaction() as session:
        _require_member(session, member_id)
        cur = get_currency(session, currency)
        before = balance(session, member_id, now, currency=cur.code)
        if data.kind == "accrual":
            entity_id = None
            if data.legal_entity is not None:
                entity_id = session.scalar(
                    select(LegalEntity.id).where(LegalEntity.code == data.legal_entity)
                )
                if entity_id is None:
                    raise not_found("legal_entity", data.legal_entity, field="legal_entity")
            entry = accrue(
                session,
                member_id=member_id,
                currency=cur.code,
                amount=data.amount,
                legal_entity_id=entity_id,
                source="manual",
                reason=data.reason,
                actor=_actor_name(actor),
                at=now,
                activation_delay=timedelta(days=data.activation_delay_days or 0),
                lifetime=timedelta(days=data.lifetime_days) if data.lifetime_days else None,
            )
        else:
            entry = write_off(
                session,
                member_id=member_id,
                currency=cur.code,
                amount=data.amount,
                source="manual",
                reason=data.reason,
                actor=_actor_name(actor),
                at=now,
            )
        after = balance(session, member_id, now, currency=cur.code)[0]
        out = _entries_out(session, [entry])[0]
        record_audit(
            session,
            actor,
            data.kind,
            "member",
            member_id,
            {"balance": before[0].model_dump(mode="json")} if before else None,
            {"entry": out.model_dump(mode="json"), "balance": after.model_dump(mode="json")},
        )
        return LedgerResult(entry=out, balance=after)


def member_balance(db: Database, member_id: int, now: datetime | None = None) -> MemberBalance:
    moment = _moment(now, "now")
    with db.reading() as session:
        return MemberBalance(member_id=member_id, at=moment, balances=balance(session, member_id, moment))


def member_history(
    db: Database,
    member_id: int,
    limit: int,
    cursor: str | None,
    *,
    currency: str | None = None,
    kind: str | None = None,
) -> Page[EntryOut]:
    """Every movement of a member's points, newest first."""
    with db.reading() as session:
        _require_member(session, member_id)
        stmt = select(LedgerEntry).where(LedgerEntry.member_id == member_id)
        if currency is not None:
            stmt = stmt.where(LedgerEntry.currency == get_currency(session, currency).code)
        if kind is not None:
            stmt = stmt.where(LedgerEntry.kind == kind)
        stmt, limit = paginate(stmt, LedgerEntry.id, limit, cursor, descending=True)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        return Page[EntryOut](items=_entries_out(session, rows), next_cursor=next_cursor)
