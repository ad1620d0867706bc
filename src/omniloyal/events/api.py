"""``POST /api/v1/events`` (batched events from sites, apps, the contact centre and integrations)
and ``GET /t/tracker.js`` (the JavaScript tracker for a site's pages).

The ingest endpoint reads its body itself: a site's tracker sends it with
``navigator.sendBeacon`` as ``text/plain`` (no CORS preflight, delivered even while the page
unloads), with the key inside the body because a beacon cannot set a header.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from omniloyal.auth import service as auth_service
from omniloyal.auth.schemas import Principal
from omniloyal.events import service, tracking
from omniloyal.events.schemas import INGEST_BODY_SCHEMA, EventIn, IngestResponse
from omniloyal.kernel.errors import AppError, Forbidden, Unauthorized
from omniloyal.settings import Settings

router = APIRouter(tags=["events"])

# Who may send events. "client" keys send their own member's events only; "tracker" keys (public,
# in a site's pages; the role is proposed in auth) send web events only and never run offers.
INGEST_ROLES = frozenset({"admin", "pos", "operator", "marketer", "client", service.TRACKER_ROLE})

_bearer = HTTPBearer(auto_error=False, description="An Omniloyal API key: `Authorization: Bearer olk_...`")


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """EventIn's JSON schema with its nested models inlined, for the OpenAPI request body."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


def _body_schema() -> dict[str, Any]:
    event = _inline_refs(EventIn.model_json_schema())
    text = json.dumps(INGEST_BODY_SCHEMA).replace(
        '{"$ref": "#/components/schemas/EventIn"}', json.dumps(event)
    )
    result: dict[str, Any] = json.loads(text)
    return result


def _principal(request: Request, credentials: HTTPAuthorizationCredentials | None, body: Any) -> Principal:
    secret: str | None = None
    if credentials is not None and credentials.scheme.lower() == "bearer" and credentials.credentials:
        secret = credentials.credentials
    elif isinstance(body, dict) and isinstance(body.get("key"), str) and body["key"]:
        secret = body["key"]
    if secret is None:
        raise Unauthorized(
            "missing_api_key", 'Send the API key as `Authorization: Bearer <key>` (or "key" in the body)'
        )
    settings: Settings = request.app.state.settings
    principal = auth_service.authenticate(request.app.state.db, secret, settings.auth_cache_seconds)
    if principal.role not in INGEST_ROLES:
        raise Forbidden(
            "forbidden",
            f"Role {principal.role!r} may not send events; allowed: {', '.join(sorted(INGEST_ROLES))}",
        )
    return principal


@router.post(
    "/api/v1/events",
    response_model=IngestResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A list of at most 1,000 events, or {events, key}. JSON; text/plain is read "
            "as JSON too (navigator.sendBeacon).",
            "content": {"application/json": {"schema": _body_schema()}},
        }
    },
    responses={413: {"description": "More than 1,000 events (`batch_too_large`)"}},
)
async def ingest(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AppError("invalid_json", f"The body is not JSON: {exc}") from exc
    principal = _principal(request, credentials, body)
    settings: Settings = request.app.state.settings
    answer: IngestResponse = await run_in_threadpool(
        service.ingest,
        request.app.state.db,
        principal,
        body,
        settings.default_phone_region,
        settings.default_timezone,
    )
    # Serialised directly: validating 1,000 results again would cost more than the ingest itself.
    return Response(content=answer.model_dump_json(), media_type="application/json")


@router.get(
    "/t/tracker.js",
    response_class=Response,
    responses={200: {"content": {"application/javascript": {}}, "description": "The tracker script"}},
)
def tracker_js(request: Request) -> Response:
    """The site tracker: anonymous visitor cookie, page/product/cart events, utm capture, identify."""
    body, etag = tracking.tracker_script()
    headers = {
        "ETag": etag,
        "Cache-Control": f"public, max-age={tracking.TRACKER_CACHE_SECONDS}",
        "X-Content-Type-Options": "nosniff",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type="application/javascript; charset=utf-8", headers=headers)
