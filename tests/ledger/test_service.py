"""Ledger service functions with a pinned clock: spending order, activation, expiry, reservations."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.ledger import service
from omniloyal.ledger.models import Currency, LedgerEntry, Lot, Posting, Reservation
from omniloyal.ledger.schemas import CurrencyBalance
from tests.ledger.helpers import T0, check_books, legal_entity, member, snapshot

DAY = timedelta(days=1)


def accrue(db: Database, member_id: int, amount: str, at: datetime = T0, **kwargs: object) -> int:
    with db.transaction() as session:
        entry = service.accrue(
            session,
            member_id=member_id,
            currency="bonus",
            amount=Decimal(amount),
            source="test",
            at=at,
            **kwargs,
        )  # type: ignore[arg-type]
        lot = session.scalar(select(Lot).where(Lot.entry_id == entry.id))
        assert lot is not None
        return lot.id


def spend(db: Database, member_id: int, amount: str, at: datetime = T0) -> LedgerEntry:
    with db.transaction() as session:
        return service.write_off(
            session, member_id=member_id, currency="bonus", amount=Decimal(amount), source="test", at=at
        )


def bonus(db: Database, member_id: int, at: datetime) -> CurrencyBalance:
    with db.reading() as session:
        return service.balance(session, member_id, at, currency="bonus")[0]


def remaining(db: Database, *lot_ids: int) -> list[Decimal]:
    with db.reading() as session:
        return [session.get_one(Lot, lot_id).remaining for lot_id in lot_ids]


def refused(code: str, db: Database, member_id: int, call: object) -> AppError:
    before = snapshot(db, member_id)
    with pytest.raises(AppError) as caught, db.transaction() as session:
        call(session)  # type: ignore[operator]
    assert caught.value.code == code, caught.value.message
    assert snapshot(db, member_id) == before
    return caught.value


@pytest.fixture
def member_id(db: Database) -> int:
    legal_entity(db)
    return member(db)


def test_write_off_spends_soonest_expiring_lots_first(db: Database, member_id: int) -> None:
    forever = accrue(db, member_id, "100")
    month = accrue(db, member_id, "30", lifetime=30 * DAY)
    week = accrue(db, member_id, "20", lifetime=7 * DAY)
    later_week = accrue(db, member_id, "10", at=T0 + timedelta(hours=1), lifetime=7 * DAY)
    entry = spend(db, member_id, "45", at=T0 + DAY)
    assert remaining(db, week, later_week, month, forever) == [0, 0, Decimal(15), 100]
    with db.reading() as session:
        member_postings = session.scalars(
            select(Posting).where(Posting.entry_id == entry.id, Posting.amount < 0).order_by(Posting.id)
        ).all()
        assert [(p.lot_id, p.amount) for p in member_postings] == [
            (week, -20),
            (later_week, -10),
            (month, -15),
        ]
        assert session.get_one(Lot, week).closed_at == T0 + DAY
    spend(db, member_id, "115", at=T0 + DAY)
    assert remaining(db, month, forever) == [0, 0]
    check_books(db, [member_id])


def test_pending_points_become_available_and_activation_is_recorded_once(
    db: Database, member_id: int
) -> None:
    accrue(db, member_id, "10")
    accrue(db, member_id, "50", activation_delay=2 * DAY, lifetime=10 * DAY)
    now = bonus(db, member_id, T0)
    assert (now.available, now.pending, now.total) == (10, 50, 60)
    assert now.next_expiries[0].at == T0 + 12 * DAY
    refused(
        "insufficient_points",
        db,
        member_id,
        lambda s: service.write_off(
            s, member_id=member_id, currency="bonus", amount=Decimal("11"), source="test", at=T0 + DAY
        ),
    )
    later = bonus(db, member_id, T0 + 2 * DAY)
    assert (later.available, later.pending) == (60, 0)
    with db.transaction() as session:
        assert service.record_activations(session, T0 + DAY) == 0
        assert service.record_activations(session, T0 + 2 * DAY) == 1
        assert service.record_activations(session, T0 + 3 * DAY) == 0
        activation = session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "activation")).one()
        assert activation.amount == 50
        assert session.scalars(select(Posting).where(Posting.entry_id == activation.id)).all() == []
    spend(db, member_id, "60", at=T0 + 2 * DAY)
    check_books(db, [member_id])


def test_expiry_burns_exactly_the_unspent_remainder(db: Database, member_id: int) -> None:
    short = accrue(db, member_id, "100", lifetime=5 * DAY)
    long = accrue(db, member_id, "40", lifetime=50 * DAY)
    spend(db, member_id, "30", at=T0 + DAY)
    with db.transaction() as session:
        assert service.expire_lots(session, T0 + 5 * DAY - timedelta(seconds=1)) == 0
    assert bonus(db, member_id, T0 + 5 * DAY - timedelta(seconds=1)).available == 110
    # Past expiry the points stop counting at once, even before the job burns them.
    assert bonus(db, member_id, T0 + 5 * DAY).available == 40
    result = service.run_jobs(db, T0 + 5 * DAY)
    assert result.expired_lots == 1
    assert service.run_jobs(db, T0 + 6 * DAY).expired_lots == 0
    assert remaining(db, short, long) == [0, 40]
    with db.reading() as session:
        expiry = session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "expiry")).one()
        assert (expiry.amount, expiry.member_id, expiry.source) == (-70, member_id, "expiry_job")
        burnt = session.scalars(select(Posting).where(Posting.entry_id == expiry.id)).all()
        assert sorted(p.amount for p in burnt) == [-70, 70]
    after = bonus(db, member_id, T0 + 6 * DAY)
    assert (after.available, after.total) == (40, 40)
    check_books(db, [member_id])


def test_reservation_holds_releases_and_confirms(db: Database, member_id: int) -> None:
    accrue(db, member_id, "100")
    with db.transaction() as session:
        service.reserve(
            session, member_id=member_id, currency="bonus", amount=Decimal(40), operation_id="op1", at=T0
        )
    held = bonus(db, member_id, T0)
    assert (held.available, held.reserved, held.total) == (60, 40, 100)
    refused(
        "insufficient_points",
        db,
        member_id,
        lambda s: service.write_off(
            s, member_id=member_id, currency="bonus", amount=Decimal("60.01"), source="test", at=T0
        ),
    )
    refused(
        "duplicate_reservation",
        db,
        member_id,
        lambda s: service.reserve(
            s, member_id=member_id, currency="bonus", amount=Decimal(1), operation_id="op1", at=T0
        ),
    )
    refused(
        "insufficient_points",
        db,
        member_id,
        lambda s: service.reserve(
            s, member_id=member_id, currency="bonus", amount=Decimal(61), operation_id="op2", at=T0
        ),
    )
    with db.transaction() as session:
        service.release_reservation(session, "op1")
        service.release_reservation(session, "op1")  # harmless twice
    assert bonus(db, member_id, T0).available == 100
    refused(
        "reservation_released", db, member_id, lambda s: service.confirm_reservation(s, "op1", source="test")
    )

    with db.transaction() as session:
        service.reserve(
            session, member_id=member_id, currency="bonus", amount=Decimal(25), operation_id="op2", at=T0
        )
    with db.transaction() as session:
        entries = service.confirm_reservation(session, "op2", source="purchase", reason="cheque 7", at=T0)
        assert [(e.kind, e.amount, e.source_ref) for e in entries] == [("write_off", -25, "op2")]
        first_id = entries[0].id
    confirmed = bonus(db, member_id, T0)
    assert (confirmed.available, confirmed.reserved, confirmed.total) == (75, 0, 75)
    with db.transaction() as session:
        again = service.confirm_reservation(session, "op2", source="purchase", at=T0)
        assert [e.id for e in again] == [first_id]
    assert bonus(db, member_id, T0).available == 75
    refused("reservation_confirmed", db, member_id, lambda s: service.release_reservation(s, "op2"))
    refused(
        "unknown_reservation", db, member_id, lambda s: service.confirm_reservation(s, "nope", source="x")
    )
    check_books(db, [member_id])


def test_a_timed_out_hold_stops_counting(db: Database, member_id: int) -> None:
    accrue(db, member_id, "50")
    with db.transaction() as session:
        service.reserve(
            session,
            member_id=member_id,
            currency="bonus",
            amount=Decimal(50),
            operation_id="op",
            at=T0,
            ttl=timedelta(minutes=15),
        )
    assert bonus(db, member_id, T0 + timedelta(minutes=14)).available == 0
    assert bonus(db, member_id, T0 + timedelta(minutes=15)).available == 50
    refused(
        "reservation_expired",
        db,
        member_id,
        lambda s: service.confirm_reservation(s, "op", source="x", at=T0 + timedelta(minutes=15)),
    )
    assert service.run_jobs(db, T0 + timedelta(minutes=16)).released_reservations == 1
    with db.reading() as session:
        assert session.scalars(select(Reservation.state)).one() == "released"


def test_service_refusals(db: Database, member_id: int) -> None:
    with db.transaction() as session:
        session.add(Currency(code="stars", name="Stars", precision=0))

    def accrual(**kwargs: object) -> object:
        args: dict[str, object] = {
            "member_id": member_id,
            "currency": "bonus",
            "amount": Decimal(5),
            "source": "test",
            "at": T0,
        }
        return lambda s: service.accrue(s, **(args | kwargs))  # type: ignore[arg-type]

    refused("invalid_amount", db, member_id, accrual(currency="stars", amount=Decimal("1.5")))
    refused("invalid_amount", db, member_id, accrual(amount=5.0))
    refused("invalid_amount", db, member_id, accrual(amount=Decimal("1e13")))
    refused("invalid_time", db, member_id, accrual(at=datetime(2026, 1, 1)))  # naive
    refused("invalid_lifetime", db, member_id, accrual(lifetime=timedelta(0)))
    refused("invalid_activation_delay", db, member_id, accrual(activation_delay=-DAY))
    refused("unknown_currency", db, member_id, accrual(currency="gold"))
    refused("unknown_member", db, member_id, accrual(member_id=10**9))
    refused("unknown_legal_entity", db, member_id, accrual(legal_entity_id=10**9))
    # A currency with 0 places takes whole points.
    with db.transaction() as session:
        entry = service.accrue(
            session, member_id=member_id, currency="stars", amount=Decimal(3), source="test", at=T0
        )
        assert entry.amount == 3
    stars = [b for b in _balances(db, member_id) if b.currency == "stars"]
    assert stars[0].available == 3
    assert format(stars[0].available, "f") == "3"


def _balances(db: Database, member_id: int) -> list[CurrencyBalance]:
    with db.reading() as session:
        return service.balance(session, member_id, T0)


def _owe(db: Database, member_id: int, amount: str) -> int:
    """A debt as ``ledger.refunds`` leaves it: a negative lot, posted against the emission account."""
    with db.transaction() as session:
        account = service._member_account(session, member_id, "bonus", lock=True, create=True)
        assert account is not None
        entity = service._legal_entity(session, None)
        emission = service._emission_account(session, entity.id, "bonus")
        entry = service._entry(
            session,
            kind="reversal",
            member_id=member_id,
            currency="bonus",
            amount=-Decimal(amount),
            source="refund",
            source_ref=None,
            reason=None,
            actor=None,
            at=T0,
        )
        debt = Lot(
            account_id=account.id,
            amount=-Decimal(amount),
            remaining=-Decimal(amount),
            accrued_at=T0,
            activates_at=T0,
            expires_at=None,
            entry_id=entry.id,
            legal_entity_id=entity.id,
            source="debt",
            activation_recorded=True,
        )
        session.add(debt)
        session.flush()
        service._post(session, entry, account.id, debt.id, -Decimal(amount))
        service._post(session, entry, emission.id, debt.id, Decimal(amount))
        return debt.id


def test_a_debt_blocks_spending_and_the_next_accruals_pay_it_first(db: Database, member_id: int) -> None:
    debt = _owe(db, member_id, "100")
    owed = bonus(db, member_id, T0)
    assert (owed.available, owed.total) == (-100, -100)
    error = refused(
        "insufficient_points",
        db,
        member_id,
        lambda s: service.write_off(
            s, member_id=member_id, currency="bonus", amount=Decimal(1), source="test", at=T0
        ),
    )
    assert error.details == {"available": "0.00", "requested": "1.00", "currency": "bonus"}
    with db.transaction() as session:
        service.accrue(session, member_id=member_id, currency="bonus", amount=Decimal(30), source="t", at=T0)
    assert remaining(db, debt) == [-70]
    assert bonus(db, member_id, T0).available == -70
    new_lot = accrue(db, member_id, "100", lifetime=DAY)
    assert remaining(db, debt, new_lot) == [0, 30]
    paid = bonus(db, member_id, T0)
    assert (paid.available, paid.total) == (30, 30)
    check_books(db, [member_id])


def test_balances_of_many_members_at_once_match_each_balance(db: Database, member_id: int) -> None:
    """The warehouse mirror reads balances of a whole batch of members in one statement: the
    same available points as the member's own balance (pending lots, holds, debts included)."""
    other, empty = member(db), member(db)
    accrue(db, member_id, "100")
    accrue(db, member_id, "30", activation_delay=3 * DAY)
    accrue(db, other, "50", lifetime=DAY)
    accrue(db, other, "20", at=T0 + DAY)
    with db.transaction() as session:
        service.reserve(
            session, member_id=member_id, currency="bonus", amount=Decimal(40), operation_id="op", at=T0
        )
    for at in (T0, T0 + 2 * DAY, T0 + 5 * DAY):
        many = service.members_balances(db, [member_id, other, empty, 999_999], at)
        assert set(many) == {member_id, other}  # no account, no balance
        for who in (member_id, other):
            each = service.member_balance(db, who, at).balances
            assert [(b.currency, b.available) for b in many[who]] == [(b.currency, b.available) for b in each]
    assert service.members_balances(db, [member_id], T0)[member_id][0].available == 60
