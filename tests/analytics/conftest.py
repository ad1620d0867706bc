"""A fresh warehouse per test, on DuckDB and on ClickHouse (chdb): every test runs on both."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from omniloyal.analytics.api import router
from omniloyal.analytics.warehouse import ChdbWarehouse, Warehouse, forget_warehouse, get_warehouse
from omniloyal.app import create_app
from omniloyal.db.engine import Database
from omniloyal.settings import Settings


@pytest.fixture(params=["duckdb", "chdb"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def wh_url(engine: str, tmp_path: Path) -> str:
    if engine == "duckdb":
        return f"duckdb:///{tmp_path}/warehouse/wh.duckdb"
    return f"chdb://?database=t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def wh(wh_url: str) -> Iterator[Warehouse]:
    """The warehouse the application opens for ``wh_url`` (the same cached instance)."""
    warehouse = get_warehouse(SimpleNamespace(warehouse_url=wh_url))
    yield warehouse
    if isinstance(warehouse, ChdbWarehouse):
        warehouse.drop_database()
    forget_warehouse(wh_url)


@pytest.fixture
def settings(db: Database, settings_base: Settings, wh_url: str) -> Settings:
    """The application's settings with this test's warehouse."""
    return settings_base.model_copy(update={"database_url": db.url, "warehouse_url": wh_url})


@pytest.fixture
def app(db: Database, settings: Settings, wh: Warehouse) -> Any:
    application = create_app(settings, db)
    # Until app.py includes the profile router, the tests add it.
    if not any(
        getattr(r, "path", "") == "/api/v1/admin/members/{member_id}/profile" for r in application.routes
    ):
        application.include_router(router)
    return application
