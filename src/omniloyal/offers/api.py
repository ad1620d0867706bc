"""HTTP endpoints for offers and target audiences.

Admin and marketer keys write; analyst and operator keys read as well.
"""

from __future__ import annotations

from enum import Enum

from fastapi import APIRouter, Depends, Query, Response

from omniloyal.auth.deps import get_db, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.pagination import DEFAULT_LIMIT, Page
from omniloyal.offers import service
from omniloyal.offers.schemas import (
    AudienceCreate,
    AudienceMemberOut,
    AudienceMembersIn,
    AudienceMembersResult,
    AudienceOut,
    OfferCreate,
    OfferOut,
    OfferStatus,
    OfferStatusIn,
    OfferUpdate,
    StatusChangeOut,
)

router = APIRouter(prefix="/api/v1/admin")

WRITERS = ("marketer",)
READERS = ("marketer", "analyst", "operator")
OFFERS: list[str | Enum] = ["offers"]
AUDIENCES: list[str | Enum] = ["target audiences"]


# ---------------------------------------------------------------- offers


@router.post("/offers", status_code=201, response_model=OfferOut, tags=OFFERS)
def create_offer(
    data: OfferCreate, db: Database = Depends(get_db), actor: Principal = Depends(require(*WRITERS))
) -> OfferOut:
    """A new offer, in status ``draft``; activate it with ``POST /offers/{id}/status``."""
    return service.create_offer(db, data, actor)


@router.get("/offers", response_model=Page[OfferOut], tags=OFFERS)
def list_offers(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    status: OfferStatus | None = None,
    q: str | None = Query(default=None, description="Part of the offer's name"),
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*READERS)),
) -> Page[OfferOut]:
    return service.list_offers(db, limit, cursor, status=status, q=q)


@router.get("/offers/{offer_id}", response_model=OfferOut, tags=OFFERS)
def get_offer(
    offer_id: int, db: Database = Depends(get_db), _: Principal = Depends(require(*READERS))
) -> OfferOut:
    return service.get_offer(db, offer_id)


@router.patch("/offers/{offer_id}", response_model=OfferOut, tags=OFFERS)
def update_offer(
    offer_id: int,
    data: OfferUpdate,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> OfferOut:
    """Changes any field (``chains`` replaces all chains); an active offer changes at once."""
    return service.update_offer(db, offer_id, data, actor)


@router.post("/offers/{offer_id}/status", response_model=OfferOut, tags=OFFERS)
def change_offer_status(
    offer_id: int,
    data: OfferStatusIn,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> OfferOut:
    """draft → active | archived; active ⇄ paused; active | paused → finished; finished → archived."""
    return service.change_status(db, offer_id, data.status, actor)


@router.get("/offers/{offer_id}/history", response_model=Page[StatusChangeOut], tags=OFFERS)
def offer_history(
    offer_id: int,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*READERS)),
) -> Page[StatusChangeOut]:
    """Status changes, oldest first."""
    return service.offer_history(db, offer_id, limit, cursor)


# ---------------------------------------------------------------- target audiences


@router.post("/audiences", status_code=201, response_model=AudienceOut, tags=AUDIENCES)
def create_audience(
    data: AudienceCreate, db: Database = Depends(get_db), actor: Principal = Depends(require(*WRITERS))
) -> AudienceOut:
    return service.create_audience(db, data, actor)


@router.get("/audiences", response_model=Page[AudienceOut], tags=AUDIENCES)
def list_audiences(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*READERS)),
) -> Page[AudienceOut]:
    return service.list_audiences(db, limit, cursor)


@router.get("/audiences/{code}", response_model=AudienceOut, tags=AUDIENCES)
def get_audience(
    code: str, db: Database = Depends(get_db), _: Principal = Depends(require(*READERS))
) -> AudienceOut:
    return service.get_audience(db, code)


@router.post("/audiences/{code}/members", response_model=AudienceMembersResult, tags=AUDIENCES)
def change_audience_members(
    code: str,
    data: AudienceMembersIn,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> AudienceMembersResult:
    """Adds, removes or replaces members (up to 100,000 ids per call)."""
    return service.change_audience_members(db, code, data, actor)


@router.get("/audiences/{code}/members", response_model=Page[AudienceMemberOut], tags=AUDIENCES)
def list_audience_members(
    code: str,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*READERS)),
) -> Page[AudienceMemberOut]:
    return service.list_audience_members(db, code, limit, cursor)


@router.delete("/audiences/{code}", status_code=204, tags=AUDIENCES)
def delete_audience(
    code: str, db: Database = Depends(get_db), actor: Principal = Depends(require(*WRITERS))
) -> Response:
    """Refused with ``audience_in_use`` while an active or paused offer filters on it."""
    service.delete_audience(db, code, actor)
    return Response(status_code=204)
