"""The FastAPI application: routers of every domain, uniform errors, background jobs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from omniloyal import __version__
from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.settings import Settings, get_settings

log = logging.getLogger("omniloyal")

# Pydantic's own error types, mapped to our codes; custom validators raise our codes directly.
_PYDANTIC_CODES = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "json_invalid": "invalid_json",
    "literal_error": "invalid_choice",
    "enum": "invalid_choice",
}


def _field_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "invalid", "msg": "Invalid request", "loc": ()}
    err_type = str(first.get("type", "invalid"))
    code = _PYDANTIC_CODES.get(
        err_type, err_type if "_" in err_type and err_type.islower() else "invalid_value"
    )
    if err_type in {"value_error", "assertion_error"} or "." in err_type:
        code = "invalid_value"
    message = str(first.get("msg", "Invalid request")).removeprefix("Value error, ")
    field = _field_of(tuple(first.get("loc", ())))
    details = [
        {
            "field": _field_of(tuple(e.get("loc", ()))),
            "message": str(e.get("msg", "")).removeprefix("Value error, "),
            "type": e.get("type"),
        }
        for e in errors
    ]
    body = {"error": {"code": code, "message": message, "field": field, "details": {"errors": details}}}
    return JSONResponse(status_code=422, content=body)


def _routers() -> list[Any]:
    from omniloyal.analytics.api import router as analytics_router
    from omniloyal.auth.api import router as auth_router
    from omniloyal.catalog.api import router as catalog_router
    from omniloyal.events.api import router as events_router
    from omniloyal.ledger.api import router as ledger_router
    from omniloyal.members.api import router as members_router
    from omniloyal.members.quality_api import router as quality_router
    from omniloyal.offers.api import router as offers_router
    from omniloyal.processing.api import router as processing_router
    from omniloyal.segments.api import router as segments_router

    return [
        # Routes are matched in order: the till's and the trackers' paths first (every purchase
        # and event batch), the admin screens after.
        processing_router,
        events_router,
        auth_router,
        catalog_router,
        quality_router,  # before members: /members/duplicates is not /members/{member_id}
        members_router,
        ledger_router,
        offers_router,
        analytics_router,
        segments_router,
    ]


async def _ledger_jobs(db: Database, interval: int) -> None:
    """Burns expired lots and records activations, every ``interval`` seconds."""
    from omniloyal.ledger import service as ledger

    while True:
        try:
            await asyncio.to_thread(ledger.run_jobs, db)
        except Exception:  # a failing job must not kill the server; it retries next round
            log.exception("ledger jobs failed")
        await asyncio.sleep(interval)


async def _daily_jobs(db: Database, settings: Settings) -> None:
    """The ``birthday`` member event, once per day in the retailer's time zone (idempotent per
    member and date, so several replicas or a restart never give a birthday bonus twice)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from omniloyal.events.service import run_birthdays

    done_for = None
    while True:
        today = datetime.now(ZoneInfo(settings.default_timezone)).date()
        if today != done_for:
            try:
                await asyncio.to_thread(run_birthdays, db, today, settings.default_timezone)
                done_for = today
            except Exception:  # retried next round
                log.exception("birthday events failed")
        await asyncio.sleep(settings.ledger_job_interval_seconds)


class Background:
    """The ledger jobs, the daily birthday events and (if ``run_workers``) the event consumers,
    in a thread of their own: what ``omniloyal serve --workers N`` runs in its supervising
    process, while N processes answer HTTP only."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.runtime: Any = None
        self.thread = threading.Thread(target=self._run, name="omniloyal-background", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.create_task(_ledger_jobs(self.db, self.settings.ledger_job_interval_seconds))
        self.loop.create_task(_daily_jobs(self.db, self.settings))
        self.loop.run_forever()

    def start(self) -> None:
        if self.settings.run_workers:
            from omniloyal.events.consumers import Runtime

            self.runtime = Runtime(self.settings, self.db)
            self.runtime.start()
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if self.runtime is not None:
            self.runtime.stop()


def api_process() -> FastAPI:
    """Factory for the HTTP-only processes of ``omniloyal serve --workers N`` (no jobs, no
    consumers: the supervising process runs them once for all)."""
    from omniloyal.cli import tune_gc

    tune_gc()
    return create_app(get_settings(), run_jobs=False)


def create_app(
    settings: Settings | None = None, db: Database | None = None, *, run_jobs: bool = False
) -> FastAPI:
    settings = settings or get_settings()
    database = db or Database(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = []
        runtime = None
        if run_jobs:
            from omniloyal.events.consumers import Runtime

            tasks.append(asyncio.create_task(_ledger_jobs(database, settings.ledger_job_interval_seconds)))
            tasks.append(asyncio.create_task(_daily_jobs(database, settings)))
            if settings.run_workers:
                # The outbox dispatcher and the event consumers, in background threads.
                runtime = Runtime(settings, database)
                await asyncio.to_thread(runtime.start)
                app.state.events = runtime
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if runtime is not None:
            await asyncio.to_thread(runtime.stop)

    app = FastAPI(
        title="Omniloyal API",
        version=__version__,
        description=(
            "Loyalty processing and marketing automation for retailers. Authenticate every request "
            "with `Authorization: Bearer <API key>`. Amounts are decimal strings; times are ISO 8601 "
            'with offset; errors are `{"error": {"code", "message", "field"}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = database

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=exc.to_dict())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": {"code": code, "message": str(exc.detail), "field": None}},
        )

    @app.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        with database.reading() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok", "version": __version__}

    for router in _routers():
        app.include_router(router)
    return app
