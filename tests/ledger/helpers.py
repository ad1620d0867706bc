"""Small builders shared by the ledger tests: members and legal entities straight through the ORM."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from omniloyal.catalog.models import LegalEntity
from omniloyal.db.engine import Database
from omniloyal.ledger.models import Account, LedgerEntry, Lot, Posting, Reservation
from omniloyal.members.models import Member
from tests.conftest import Api

ADMIN = "/api/v1/admin"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def legal_entity(db: Database, code: str = "LE1", *, default: bool = True) -> int:
    with db.transaction() as session:
        entity = LegalEntity(code=code, name=f"Entity {code}", is_default=default)
        session.add(entity)
        session.flush()
        return entity.id


def member(db: Database) -> int:
    with db.transaction() as session:
        row = Member(first_name="Ann")
        session.add(row)
        session.flush()
        return row.id


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def post_ledger(api: Api, member_id: int, **body: Any) -> Any:
    return api.post(f"{ADMIN}/members/{member_id}/ledger", json={"reason": "test", **body})


def balance_of(api: Api, member_id: int, currency: str = "bonus") -> dict[str, Any]:
    body = ok(api.get(f"{ADMIN}/members/{member_id}/balance"))
    found = [b for b in body["balances"] if b["currency"] == currency]
    if not found:
        return {"available": "0", "pending": "0", "reserved": "0", "total": "0", "next_expiries": []}
    item: dict[str, Any] = found[0]
    return item


def history(api: Api, member_id: int, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = ok(api.get(f"{ADMIN}/members/{member_id}/history", params=params))["items"]
    return items


def snapshot(db: Database, member_id: int) -> dict[str, Any]:
    """Everything the ledger stores about one member (to prove a refusal changed nothing)."""
    with db.reading() as session:
        accounts = list(session.scalars(select(Account.id).where(Account.member_id == member_id)).all())
        lots = session.execute(
            select(Lot.id, Lot.remaining, Lot.closed_at, Lot.activation_recorded)
            .where(Lot.account_id.in_(accounts))
            .order_by(Lot.id)
        ).all()
        reservations = session.execute(
            select(Reservation.id, Reservation.state, Reservation.amount, Reservation.entry_id)
            .where(Reservation.account_id.in_(accounts))
            .order_by(Reservation.id)
        ).all()
        entries = session.scalar(select(func.count()).where(LedgerEntry.member_id == member_id))
        postings = session.execute(select(func.count(), func.sum(Posting.amount))).one()
        return {
            "accounts": accounts,
            "lots": [tuple(r) for r in lots],
            "reservations": [tuple(r) for r in reservations],
            "entries": entries,
            "postings": tuple(postings),
        }


def check_books(db: Database, member_ids: list[int]) -> None:
    """The ledger's invariants: double entry balances, lots explain member accounts, no lot overdrawn."""
    with db.reading() as session:
        total = session.scalar(select(func.coalesce(func.sum(Posting.amount), 0)))
        assert Decimal(total) == 0
        accounts = session.scalars(select(Account).where(Account.member_id.in_(member_ids))).all()
        for account in accounts:
            posted = session.scalar(
                select(func.coalesce(func.sum(Posting.amount), 0)).where(Posting.account_id == account.id)
            )
            lots = session.scalars(select(Lot).where(Lot.account_id == account.id)).all()
            assert Decimal(posted) == sum((lot.remaining for lot in lots), Decimal(0))
            for lot in lots:
                if lot.amount >= 0:
                    assert 0 <= lot.remaining <= lot.amount
                else:  # a debt: negative, paid off towards zero
                    assert lot.amount <= lot.remaining <= 0
                assert (lot.remaining == 0) == (lot.closed_at is not None)
