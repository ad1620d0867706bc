"""The POS API: what tills and the online checkout call for every purchase."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ValidationError

from omniloyal.auth.deps import get_db, get_settings_dep, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.processing import service
from omniloyal.processing.schemas import (
    BalanceResponse,
    CalculateRequest,
    CalculateResponse,
    ConfirmResponse,
    Identifier,
    OfflineBatch,
    OfflineResponse,
    OperationRef,
    RefundRequest,
    RefundResponse,
)
from omniloyal.settings import Settings

router = APIRouter(prefix="/api/v1/pos", tags=["pos"])

# Tills (pos keys, bound to their store) and admins (naming the store) may process purchases.
_POS = require("pos")


def _json(answer: BaseModel, *, exclude_none: bool = False) -> Response:
    """The answer serialised once. Returned as a model, FastAPI would dump it, validate the dump
    against the response model and serialise it again: a third of a till request's CPU. The
    ``response_model`` of each route still documents the shape."""
    return Response(answer.model_dump_json(exclude_none=exclude_none), media_type="application/json")


@router.post("/calculate", response_model=CalculateResponse, response_model_exclude_none=True)
def calculate(
    request: CalculateRequest,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    principal: Principal = Depends(_POS),
) -> Response:
    """Discounts, points to earn, the most the buyer may pay with points; reserves the requested
    write-off. Nothing changes on the balance until confirm."""
    return _json(service.calculate(db, principal, request, settings.default_phone_region), exclude_none=True)


@router.post("/confirm", response_model=ConfirmResponse)
def confirm(
    request: OperationRef, db: Database = Depends(get_db), principal: Principal = Depends(_POS)
) -> Response:
    """Books the reserved write-off and the planned accruals (a repeat returns the same answer)."""
    return _json(service.confirm(db, principal, request))


@router.post("/cancel", response_model=ConfirmResponse)
def cancel(
    request: OperationRef, db: Database = Depends(get_db), principal: Principal = Depends(_POS)
) -> ConfirmResponse:
    """Releases the reservation of a calculated purchase."""
    return service.cancel(db, principal, request)


@router.post("/refund", response_model=RefundResponse)
def refund(
    request: RefundRequest, db: Database = Depends(get_db), principal: Principal = Depends(_POS)
) -> RefundResponse:
    """Returns lines of a confirmed purchase: takes back the points they earned and gives back the
    points they were paid with, in proportion to the share returned."""
    return service.refund(db, principal, request)


@router.get("/balance", response_model=BalanceResponse)
def balance(
    card: str | None = Query(default=None),
    phone: str | None = Query(default=None),
    email: str | None = Query(default=None),
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    principal: Principal = Depends(require("pos", "operator", "client")),
) -> BalanceResponse:
    try:
        identifier = Identifier.model_validate({"card": card, "phone": phone, "email": email})
    except ValidationError as exc:
        raise AppError("identifier_required", "Give exactly one of card, phone or email") from exc
    return service.balance(db, principal, identifier, settings.default_phone_region)


@router.post("/offline-cheques", response_model=OfflineResponse)
def offline_cheques(
    batch: OfflineBatch,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    principal: Principal = Depends(_POS),
) -> OfflineResponse:
    """Cheques stored while the till was offline: accrual only, by the offers valid at purchase
    time; each cheque is accepted, a duplicate, or rejected with its error."""
    return service.offline_cheques(db, principal, batch, settings.default_phone_region)
