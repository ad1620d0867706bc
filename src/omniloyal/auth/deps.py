"""FastAPI dependencies: the database and the calling principal, checked against roles.

They are ``async`` although they do no I/O (or, for an uncached key, one short read): FastAPI
runs a plain ``def`` dependency in its thread pool, and three thread hand-offs per request cost
a till more than the dependencies themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from omniloyal.auth import service
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError, Forbidden, Unauthorized
from omniloyal.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An Omniloyal API key: `Authorization: Bearer olk_...`")


async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def current_principal(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing_api_key", "Send the API key as `Authorization: Bearer <key>`")
    settings: Settings = request.app.state.settings
    return service.authenticate(request.app.state.db, credentials.credentials, settings.auth_cache_seconds)


def require(*roles: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets only the given roles through (``admin`` always passes)."""
    allowed = frozenset(roles) | {"admin"}

    async def check(principal: Principal = Depends(current_principal)) -> Principal:
        if principal.role not in allowed:
            raise Forbidden(
                "forbidden",
                f"Role {principal.role!r} may not do this; allowed: {', '.join(sorted(allowed))}",
            )
        return principal

    return check


def check_member_scope(principal: Principal, member_id: int) -> None:
    """A client key sees only its own member."""
    if principal.role == "client" and principal.member_id != member_id:
        raise Forbidden("forbidden", "A client key may only access its own member")


def check_store_scope(principal: Principal, store_id: int) -> None:
    """A pos key acts only in its own store."""
    if principal.role == "pos" and principal.store_id != store_id:
        raise AppError("store_mismatch", "This pos key is bound to another store", status_code=403)
