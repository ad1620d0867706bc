"""API keys: create, authenticate (with a short in-process cache), revoke; the audit log."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from omniloyal.auth.models import ApiKey, AuditRecord
from omniloyal.auth.schemas import AuditOut, KeyCreate, KeyCreated, KeyOut, Principal
from omniloyal.catalog.models import Store
from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError, Unauthorized, not_found
from omniloyal.kernel.pagination import Page, cut, paginate
from omniloyal.members.models import Member

KEY_PREFIX = "olk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_out(key: ApiKey, store_code: str | None) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "role": key.role,
        "store": store_code,
        "member_id": key.member_id,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


def create_key_in(session: Session, data: KeyCreate) -> KeyCreated:
    store_id: int | None = None
    if data.role == "pos":
        if not data.store:
            raise AppError("store_required", "A pos key is bound to one store: give its code", field="store")
        store = session.scalar(select(Store).where(Store.code == data.store))
        if store is None:
            raise not_found("store", data.store, field="store")
        store_id = store.id
    elif data.store:
        raise AppError("store_not_allowed", "Only pos keys are bound to a store", field="store")
    if data.role == "client":
        if data.member_id is None:
            raise AppError("member_required", "A client key is bound to one member", field="member_id")
        if session.get(Member, data.member_id) is None:
            raise not_found("member", data.member_id, field="member_id")
    elif data.member_id is not None:
        raise AppError("member_not_allowed", "Only client keys are bound to a member", field="member_id")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        name=data.name or f"{data.role} key",
        key_hash=hash_key(secret),
        prefix=secret[:12],
        role=data.role,
        store_id=store_id,
        member_id=data.member_id,
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return KeyCreated(**_key_out(key, data.store), key=secret)


def create_key(db: Database, data: KeyCreate, actor: Principal | None = None) -> KeyCreated:
    with db.transaction() as session:
        created = create_key_in(session, data)
        if actor is not None:
            record_audit(
                session,
                actor,
                "create",
                "api_key",
                created.id,
                None,
                created.model_dump(mode="json", exclude={"key"}),
            )
        return created


def list_keys(db: Database, limit: int, cursor: str | None) -> Page[KeyOut]:
    with db.reading() as session:
        stmt, limit = paginate(
            select(ApiKey, Store.code).outerjoin(Store, Store.id == ApiKey.store_id), ApiKey.id, limit, cursor
        )
        rows = list(session.execute(stmt).all())
        page, next_cursor = cut(rows, limit, lambda r: r[0].id)
        return Page[KeyOut](items=[KeyOut(**_key_out(k, code)) for k, code in page], next_cursor=next_cursor)


def revoke_key(db: Database, key_id: int, actor: Principal) -> KeyOut:
    with db.transaction() as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            raise not_found("api_key", key_id)
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            record_audit(
                session,
                actor,
                "revoke",
                "api_key",
                key.id,
                {"revoked_at": None},
                {"revoked_at": key.revoked_at.isoformat()},
            )
        store_code = (
            session.scalar(select(Store.code).where(Store.id == key.store_id)) if key.store_id else None
        )
        _cache.clear()
        return KeyOut(**_key_out(key, store_code))


class _KeyCache:
    """Keys looked up recently, so a till's request costs no extra query."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, ttl: float) -> tuple[bool, Principal | None]:
        with self._lock:
            item = self._items.get(digest)
        if item is None or time.monotonic() - item[0] > ttl:
            return False, None
        return True, item[1]

    def put(self, digest: str, principal: Principal | None) -> None:
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[digest] = (time.monotonic(), principal)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _KeyCache()


def authenticate(db: Database, secret: str, cache_seconds: float) -> Principal:
    digest = hash_key(secret)
    hit, principal = _cache.get(digest, cache_seconds) if cache_seconds > 0 else (False, None)
    if not hit:
        with db.reading() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            principal = None
            if key is not None and key.revoked_at is None:
                principal = Principal(
                    key_id=key.id,
                    name=key.name,
                    role=key.role,
                    store_id=key.store_id,
                    member_id=key.member_id,
                )
        _cache.put(digest, principal)
    if principal is None:
        raise Unauthorized("invalid_api_key", "The API key is unknown or revoked")
    return principal


def _jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)


def record_audit(
    session: Session,
    actor: Principal,
    action: str,
    entity: str,
    entity_id: object,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """Writes one audit record in the caller's transaction (so it exists iff the change does)."""
    session.add(
        AuditRecord(
            at=utcnow(),
            actor_key_id=actor.key_id,
            actor=f"{actor.role}:{actor.name}",
            action=action,
            entity=entity,
            entity_id=str(entity_id),
            before=_jsonable(before) if before is not None else None,
            after=_jsonable(after) if after is not None else None,
        )
    )


def list_audit(
    db: Database, limit: int, cursor: str | None, entity: str | None = None, entity_id: str | None = None
) -> Page[AuditOut]:
    with db.reading() as session:
        stmt = select(AuditRecord)
        if entity:
            stmt = stmt.where(AuditRecord.entity == entity)
        if entity_id:
            stmt = stmt.where(AuditRecord.entity_id == entity_id)
        stmt, limit = paginate(stmt, AuditRecord.id, limit, cursor, descending=True)
        rows = list(session.scalars(stmt).all())
        page, next_cursor = cut(rows, limit)
        return Page[AuditOut](
            items=[AuditOut.model_validate(r, from_attributes=True) for r in page], next_cursor=next_cursor
        )
