"""Property tests: whatever happens to a member's points, the books stay balanced.

A random sequence of accruals (random delay and lifetime), write-offs (some beyond what is
available), reservations, confirms, releases, card replacements and clock advances with job runs
is played with a pinned clock; after every step the ledger's invariants must hold, and every
refusal must leave the store exactly as it was.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from omniloyal.auth.schemas import Principal
from omniloyal.catalog.models import LegalEntity
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.ledger import service
from omniloyal.members import service as members
from omniloyal.members.models import Card
from omniloyal.members.schemas import CardBlock
from tests.ledger.helpers import T0, check_books, member, snapshot

# Mostly whole points on a small scale, so write-offs and holds often land near the balance;
# sometimes cents.
amounts = st.one_of(
    st.integers(min_value=1, max_value=60).map(Decimal),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal(100), places=2),
)
# A write-off or hold: a fixed amount, or a share of what the member holds in total (reserved and
# pending included), so requests often fall just inside or just outside what is available.
spends = st.one_of(
    amounts, st.sampled_from(["0.3", "0.5", "0.9", "1", "1.2"]).map(lambda share: ("share", share))
)
accrual = st.tuples(
    st.just("accrue"),
    amounts,
    st.sampled_from([0, 0, 1, 2]),  # activation delay, days
    st.sampled_from([None, 1, 2, 3]),  # lifetime, days
)
# Every run opens with a few accruals, so the steps after have points to spend, hold and burn.
steps = st.tuples(
    st.lists(accrual, min_size=1, max_size=3),
    st.lists(
        st.one_of(
            accrual,
            st.tuples(st.just("write_off"), spends),
            st.tuples(st.just("reserve"), spends, st.sampled_from([None, 1, 30])),  # ttl, hours
            st.tuples(st.just("confirm"), st.integers(min_value=0, max_value=5)),
            st.tuples(st.just("release"), st.integers(min_value=0, max_value=5)),
            st.tuples(st.just("advance"), st.sampled_from([1, 12, 24, 48])),  # hours
            st.tuples(st.just("replace_card")),
        ),
        min_size=4,
        max_size=16,
    ),
).map(lambda parts: parts[0] + parts[1])


def _ensure_default_entity(db: Database) -> None:
    with db.transaction() as session:
        if session.scalar(select(LegalEntity.id).where(LegalEntity.is_default.is_(True))) is None:
            session.add(LegalEntity(code="LE1", name="Entity", is_default=True))


def _balance(db: Database, member_id: int, now: Any) -> tuple[Decimal, Decimal]:
    """(available, total); checks (d) on the way."""
    with db.reading() as session:
        balances = service.balance(session, member_id, now)
    for item in balances:
        assert item.available >= 0 and item.pending >= 0 and item.reserved >= 0
        assert item.total == item.available + item.reserved + item.pending
    return (balances[0].available, balances[0].total) if balances else (Decimal(0), Decimal(0))


OPERATOR = Principal(key_id=None, name="property test", role="operator")


def _give_card(db: Database, member_id: int, number: str) -> None:
    with db.transaction() as session:
        session.add(Card(number=number, member_id=member_id, kind="physical", state="activated"))


def _replace_card(db: Database, number: str, new_number: str, now: Any) -> None:
    """Lost card: block, replace; the member behind the new card has the same points."""
    with db.reading() as session:
        before = service.balance(session, members.card_for_processing(session, number).member_id or 0, now)
    members.block_card(db, number, CardBlock(reason="lost"), OPERATOR)
    members.replace_card(db, number, new_number, OPERATOR)
    with db.reading() as session:
        holder = members.card_for_processing(session, new_number).member_id
        assert holder is not None
        assert service.balance(session, holder, now) == before
        old = session.scalar(select(Card).where(Card.number == number))
        assert old is not None and old.blocked


def _amount(spec: Any, total: Decimal) -> Decimal:
    if isinstance(spec, tuple):
        return max((total * Decimal(spec[1])).quantize(Decimal("0.01")), Decimal("0.01"))
    amount: Decimal = spec
    return amount


@settings(
    max_examples=30,
    deadline=None,
    database=None,  # no example files left in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=steps)
def test_books_always_balance(db: Database, steps: list[tuple[Any, ...]]) -> None:
    _ensure_default_entity(db)
    member_id = member(db)
    card = f"77{member_id:08d}00"
    _give_card(db, member_id, card)
    now = T0
    operations: list[str] = []
    for index, step in enumerate(steps):
        kind = step[0]
        if kind == "advance":
            now += timedelta(hours=step[1])
            service.run_jobs(db, now)
        elif kind == "replace_card":
            new_card = f"77{member_id:08d}{index + 1:02d}"
            _replace_card(db, card, new_card, now)
            card = new_card
        else:
            available, total = _balance(db, member_id, now)
            if kind in ("write_off", "reserve"):
                step = (kind, _amount(step[1], total), *step[2:])
            before = snapshot(db, member_id)
            try:
                with db.transaction() as session:
                    if kind == "accrue":
                        service.accrue(
                            session,
                            member_id=member_id,
                            currency="bonus",
                            amount=step[1],
                            source="test",
                            at=now,
                            activation_delay=timedelta(days=step[2]),
                            lifetime=timedelta(days=step[3]) if step[3] else None,
                        )
                    elif kind == "write_off":
                        service.write_off(
                            session,
                            member_id=member_id,
                            currency="bonus",
                            amount=step[1],
                            source="test",
                            at=now,
                        )
                    elif kind == "reserve":
                        operation_id = f"m{member_id}-op{index}"
                        service.reserve(
                            session,
                            member_id=member_id,
                            currency="bonus",
                            amount=step[1],
                            operation_id=operation_id,
                            at=now,
                            ttl=timedelta(hours=step[2]) if step[2] else None,
                        )
                        operations.append(operation_id)
                    elif operations:
                        operation_id = operations[step[1] % len(operations)]
                        if kind == "confirm":
                            service.confirm_reservation(session, operation_id, source="test", at=now)
                        else:
                            service.release_reservation(session, operation_id)
            except AppError as refusal:
                # (e) a refused operation changes nothing
                assert snapshot(db, member_id) == before, refusal.code
                if kind in ("write_off", "reserve"):
                    assert refusal.code == "insufficient_points"
                    assert step[1] > available
            else:
                if kind in ("write_off", "reserve"):
                    assert step[1] <= available
        # (a), (b), (c) after every step; (d) inside _balance
        check_books(db, [member_id])
        _balance(db, member_id, now)
