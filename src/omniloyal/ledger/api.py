"""HTTP endpoints of the ledger package: currencies, emission accounts, member balance and history."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from omniloyal.auth.deps import check_member_scope, get_db, get_settings_dep, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.pagination import DEFAULT_LIMIT, Page
from omniloyal.ledger import service
from omniloyal.ledger.schemas import (
    CurrencyCreate,
    CurrencyOut,
    EmissionAccountOut,
    EntryKind,
    EntryOut,
    LedgerRequest,
    LedgerResult,
    MemberBalance,
)
from omniloyal.settings import Settings

router = APIRouter(prefix="/api/v1/admin", tags=["ledger"])

_BALANCE_READERS = ("operator", "marketer", "analyst", "client")


@router.post("/currencies", status_code=201, response_model=CurrencyOut)
def create_currency(
    data: CurrencyCreate, db: Database = Depends(get_db), actor: Principal = Depends(require("admin"))
) -> CurrencyOut:
    return service.create_currency(db, data, actor)


@router.get("/currencies", response_model=Page[CurrencyOut])
def list_currencies(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require("marketer", "operator", "analyst", "pos", "client")),
) -> Page[CurrencyOut]:
    return service.list_currencies(db, limit, cursor)


@router.get("/legal-entities/{code}/accounts", response_model=Page[EmissionAccountOut])
def emission_accounts(
    code: str,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require("operator", "analyst")),
) -> Page[EmissionAccountOut]:
    """The legal entity's emission accounts; a negative balance is points issued and not yet returned."""
    return service.emission_accounts(db, code, limit, cursor)


@router.post("/members/{member_id}/ledger", status_code=201, response_model=LedgerResult)
def post_ledger(
    member_id: int,
    data: LedgerRequest,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    actor: Principal = Depends(require("operator")),
) -> LedgerResult:
    """Manual accrual or write-off; the reason is required and shown in the member's history."""
    return service.post_manual(db, member_id, data, actor, settings.default_currency)


@router.get("/members/{member_id}/balance", response_model=MemberBalance)
def member_balance(
    member_id: int, db: Database = Depends(get_db), principal: Principal = Depends(require(*_BALANCE_READERS))
) -> MemberBalance:
    check_member_scope(principal, member_id)
    return service.member_balance(db, member_id)


@router.get("/members/{member_id}/history", response_model=Page[EntryOut])
def member_history(
    member_id: int,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    currency: str | None = None,
    kind: EntryKind | None = Query(default=None, description="accrual, write_off, expiry, activation..."),
    db: Database = Depends(get_db),
    principal: Principal = Depends(require(*_BALANCE_READERS)),
) -> Page[EntryOut]:
    """Every movement of the member's points, newest first."""
    check_member_scope(principal, member_id)
    return service.member_history(db, member_id, limit, cursor, currency=currency, kind=kind)
