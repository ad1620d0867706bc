"""Refunds on the ledger: take back points a purchase earned, give back points it was paid with.

* ``reverse_accrual`` takes the earned points back from the purchase's own lots first, then from
  the member's other active lots; what the member already spent becomes a **debt**: a lot with a
  negative remainder that later accruals pay off first. So a balance goes below zero only where
  the points were already spent.
* ``return_write_off`` puts points back into the very lots the purchase spent, so they keep their
  original expiry (a lot that expired meanwhile is burnt by the next expiry run).

Both are ordinary double-entry movements between the member account and the emission accounts.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from omniloyal.kernel.errors import AppError
from omniloyal.kernel.money import ZERO
from omniloyal.ledger.models import Account, LedgerEntry, Lot, Posting
from omniloyal.ledger.service import (
    _active_lots,
    _emission_account,
    _entry,
    _legal_entity,
    _member_account,
    _moment,
    _post,
    check_amount,
    get_currency,
)

DEBT_SOURCE = "debt"


def _locked_account(session: Session, member_id: int, currency: str) -> Account:
    account = _member_account(session, member_id, currency, lock=True, create=True)
    assert account is not None
    return account


def reverse_accrual(
    session: Session,
    *,
    member_id: int,
    currency: str,
    amount: Decimal,
    source: str,
    source_ref: str | None,
    original_ref: str,
    reason: str | None = None,
    actor: str | None = None,
    at: datetime | None = None,
) -> LedgerEntry:
    now = _moment(at)
    cur = get_currency(session, currency)
    value = check_amount(amount, cur)
    account = _locked_account(session, member_id, cur.code)
    own = list(
        session.scalars(
            select(Lot)
            .join(LedgerEntry, LedgerEntry.id == Lot.entry_id)
            .where(
                Lot.account_id == account.id,
                LedgerEntry.source_ref == original_ref,
                LedgerEntry.kind == "accrual",
                Lot.remaining > ZERO,
                Lot.closed_at.is_(None),
            )
            .order_by(Lot.id)
            .execution_options(populate_existing=True)
        )
    )
    others = [lot for lot in _active_lots(session, account.id, now) if lot.id not in {o.id for o in own}]
    entry = _entry(
        session,
        kind="reversal",
        member_id=member_id,
        currency=cur.code,
        amount=-value,
        source=source,
        source_ref=source_ref,
        reason=reason,
        actor=actor,
        at=now,
        details={"original_ref": original_ref},
    )
    left = value
    entity_id: int | None = None
    for lot in own + others:
        if left <= 0:
            break
        take = min(lot.remaining, left)
        lot.remaining -= take
        if lot.remaining == 0:
            lot.closed_at = now
        emission = _emission_account(session, lot.legal_entity_id, cur.code)
        _post(session, entry, account.id, lot.id, -take)
        _post(session, entry, emission.id, lot.id, take)
        entity_id = entity_id or lot.legal_entity_id
        left -= take
    if left > 0:
        # Already spent: the member owes these points; the next accruals pay the debt first.
        entity = _legal_entity(session, entity_id)
        debt = Lot(
            account_id=account.id,
            amount=-left,
            remaining=-left,
            accrued_at=now,
            activates_at=now,
            expires_at=None,
            entry_id=entry.id,
            legal_entity_id=entity.id,
            source=DEBT_SOURCE,
            activation_recorded=True,
        )
        session.add(debt)
        session.flush()
        emission = _emission_account(session, entity.id, cur.code)
        _post(session, entry, account.id, debt.id, -left)
        _post(session, entry, emission.id, debt.id, left)
    session.flush()
    return entry


def return_write_off(
    session: Session,
    *,
    member_id: int,
    currency: str,
    amount: Decimal,
    source: str,
    source_ref: str | None,
    original_ref: str,
    reason: str | None = None,
    actor: str | None = None,
    at: datetime | None = None,
) -> LedgerEntry:
    now = _moment(at)
    cur = get_currency(session, currency)
    value = check_amount(amount, cur)
    account = _locked_account(session, member_id, cur.code)
    spent = list(
        session.execute(
            select(Posting.lot_id, Posting.amount)
            .join(LedgerEntry, LedgerEntry.id == Posting.entry_id)
            .where(
                LedgerEntry.source_ref == original_ref,
                LedgerEntry.kind == "write_off",
                Posting.account_id == account.id,
                Posting.lot_id.is_not(None),
            )
            .order_by(Posting.id)
        )
    )
    # What earlier refunds of the same purchase already gave back, per lot.
    given_back: dict[int, Decimal] = {}
    for lot_id, posted in session.execute(
        select(Posting.lot_id, Posting.amount)
        .join(LedgerEntry, LedgerEntry.id == Posting.entry_id)
        .where(
            LedgerEntry.kind == "refund",
            Posting.account_id == account.id,
            LedgerEntry.details["original_ref"].as_string() == original_ref,
        )
    ):
        if lot_id is not None:
            given_back[lot_id] = given_back.get(lot_id, ZERO) + posted
    room = [
        (lot_id, -posted - given_back.pop(lot_id, ZERO)) for lot_id, posted in spent if lot_id is not None
    ]
    if sum((r for _, r in room), ZERO) < value:
        raise AppError(
            "refund_exceeds_write_off",
            f"The purchase {original_ref!r} was paid with less {cur.code} than {value} still to return",
            field="amount",
        )
    entry = _entry(
        session,
        kind="refund",
        member_id=member_id,
        currency=cur.code,
        amount=value,
        source=source,
        source_ref=source_ref,
        reason=reason,
        actor=actor,
        at=now,
        details={"original_ref": original_ref},
    )
    left = value
    for lot_id, free in room:
        if left <= 0:
            break
        give = min(free, left)
        if give <= 0:
            continue
        lot = session.get(Lot, lot_id, populate_existing=True)
        assert lot is not None
        lot.remaining += give
        lot.closed_at = None  # open again; if it expired meanwhile, the next expiry run burns it
        emission = _emission_account(session, lot.legal_entity_id, cur.code)
        _post(session, entry, emission.id, lot.id, -give)
        _post(session, entry, account.id, lot.id, give)
        left -= give
    session.flush()
    return entry
