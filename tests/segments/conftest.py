"""Segments run on both warehouse engines: every test asking for ``wh`` runs on DuckDB and on
ClickHouse (chdb); those asking for ``db`` also run on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from omniloyal.analytics.api import router as profile_router
from omniloyal.analytics.warehouse import ChdbWarehouse, Warehouse, forget_warehouse, get_warehouse
from omniloyal.app import create_app
from omniloyal.db.engine import Database
from omniloyal.segments import tables
from omniloyal.segments.api import router
from omniloyal.settings import Settings


@pytest.fixture(params=["duckdb", "chdb"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def wh_url(engine: str, tmp_path: Path) -> str:
    if engine == "duckdb":
        return f"duckdb:///{tmp_path}/warehouse/wh.duckdb"
    return f"chdb://?database=s_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def wh(wh_url: str) -> Iterator[Warehouse]:
    """The warehouse the application opens for ``wh_url``, with the segments' tables."""
    warehouse = get_warehouse(SimpleNamespace(warehouse_url=wh_url))
    tables.ensure(warehouse)
    yield warehouse
    tables.forget(warehouse)
    if isinstance(warehouse, ChdbWarehouse):
        warehouse.drop_database()
    forget_warehouse(wh_url)


@pytest.fixture
def settings(db: Database, settings_base: Settings, wh_url: str) -> Settings:
    return settings_base.model_copy(update={"database_url": db.url, "warehouse_url": wh_url})


@pytest.fixture
def app(db: Database, settings: Settings, wh: Warehouse) -> Any:
    application = create_app(settings, db)
    paths = {getattr(r, "path", "") for r in application.routes}
    # Until app.py includes these routers, the tests add them.
    if "/api/v1/admin/segments" not in paths:
        application.include_router(router)
    if "/api/v1/admin/members/{member_id}/profile" not in paths:
        application.include_router(profile_router)
    return application
