"""Shared fixtures.

Every test that asks for ``db`` (or ``client``/``api``) runs twice: on SQLite and on
PostgreSQL. PostgreSQL tests skip when the server is not reachable, unless
``OMNILOYAL_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from omniloyal.app import create_app
from omniloyal.auth import service as auth_service
from omniloyal.auth.schemas import KeyCreate
from omniloyal.bootstrap import prepare
from omniloyal.db.base import Base, import_all_models
from omniloyal.db.engine import Database
from omniloyal.settings import Settings

POSTGRES_URL = os.environ.get("OMNILOYAL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("OMNILOYAL_REQUIRE_SERVICES") == "1"

import_all_models()


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _postgres_admin_url() -> str:
    return POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)


def _postgres_available() -> str | None:
    try:
        engine = create_engine(_postgres_admin_url(), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # the reason goes into the skip message
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.__class__.__name__}"


def _create_postgres_database(name: str) -> str:
    engine = create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    base, _, _ = POSTGRES_URL.rpartition("/")
    return f"{base}/{name}"


def _drop_postgres_database(name: str) -> None:
    engine = create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def settings_base() -> Settings:
    # An in-memory warehouse: tests that start the event runtime never create ./data/.
    return Settings(database_url="sqlite://", warehouse_url="duckdb:///:memory:", auth_cache_seconds=0)


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory, settings_base: Settings) -> Iterator[Database]:
    path: Path = tmp_path_factory.mktemp("store") / "omniloyal.db"
    db = Database(f"sqlite:///{path}")
    prepare(db, settings_base)
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def postgres_database(settings_base: Settings) -> Iterator[Database]:
    reason = _postgres_available()
    if reason:
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason} (OMNILOYAL_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    name = f"omniloyal_test_{_worker()}_{os.getpid()}"
    db = Database(_create_postgres_database(name))
    prepare(db, settings_base)
    yield db
    db.dispose()
    _drop_postgres_database(name)


def _empty(db: Database, settings: Settings) -> None:
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            conn.execute(
                text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
            )
        else:
            for table in tables:
                conn.execute(text(f'DELETE FROM "{table}"'))
    prepare(db, settings)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, settings_base: Settings) -> Database:
    """An empty, migrated operational store (with the default currency)."""
    database: Database = request.getfixturevalue(f"{request.param}_database")
    _empty(database, settings_base)
    return database


@pytest.fixture
def settings(db: Database, settings_base: Settings) -> Settings:
    return settings_base.model_copy(update={"database_url": db.url})


@pytest.fixture
def app(db: Database, settings: Settings) -> Any:
    return create_app(settings, db)


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def make_key(db: Database, role: str, **scope: Any) -> str:
    return auth_service.create_key(db, KeyCreate(role=role, **scope)).key  # type: ignore[arg-type]


@pytest.fixture
def admin_key(db: Database) -> str:
    return make_key(db, "admin", name="test admin")


class Api:
    """A test client that sends a key; ``as_key`` gives the same client with another key."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client = client
        self.key = key

    def as_key(self, key: str) -> Api:
        return Api(self.client, key)

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.key}", **kwargs.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> Any:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> Any:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.request("DELETE", url, **kwargs)


@pytest.fixture
def api(client: TestClient, admin_key: str) -> Api:
    """The API as an admin."""
    return Api(client, admin_key)


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    """Checks the uniform error body and returns it."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if field is not None:
        assert body["error"]["field"] == field, body
    return body
