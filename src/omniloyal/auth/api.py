"""Admin endpoints for API keys and the audit log."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from omniloyal.auth import service
from omniloyal.auth.deps import get_db, require
from omniloyal.auth.schemas import AuditOut, KeyCreate, KeyCreated, KeyOut, Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.pagination import DEFAULT_LIMIT, Page

router = APIRouter(prefix="/api/v1/admin", tags=["keys and audit"])


@router.post("/keys", status_code=201, response_model=KeyCreated)
def create_key(
    data: KeyCreate, db: Database = Depends(get_db), actor: Principal = Depends(require("admin"))
) -> KeyCreated:
    return service.create_key(db, data, actor)


@router.get("/keys", response_model=Page[KeyOut])
def list_keys(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require("admin")),
) -> Page[KeyOut]:
    return service.list_keys(db, limit, cursor)


@router.post("/keys/{key_id}/revoke", response_model=KeyOut)
def revoke_key(
    key_id: int, db: Database = Depends(get_db), actor: Principal = Depends(require("admin"))
) -> KeyOut:
    return service.revoke_key(db, key_id, actor)


@router.get("/audit", response_model=Page[AuditOut])
def list_audit(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    entity: str | None = Query(default=None, description="member, card, store, offer..."),
    entity_id: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require("admin", "analyst")),
) -> Page[AuditOut]:
    return service.list_audit(db, limit, cursor, entity, entity_id)
