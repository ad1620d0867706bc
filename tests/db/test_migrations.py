"""The migrations build exactly the schema the models describe, on both stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from omniloyal.db.base import Base
from omniloyal.db.engine import Database
from omniloyal.db.migrate import upgrade


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": False}
        )
        differences = compare_metadata(context, Base.metadata)
    # alembic_version is the migration tool's own table, not a model.
    differences = [d for d in differences if "alembic_version" not in repr(d)]
    assert differences == [], f"run `omniloyal migrate --new MESSAGE` to capture: {differences}"


def test_upgrading_a_store_that_holds_data(tmp_path: Path) -> None:
    """SQLite copies a table to alter it: an upgrade must not trip over rows that reference it."""
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(db.engine, "0007")
    with db.engine.begin() as connection:
        _insert(connection, "members", id=1)
        _insert(connection, "cards", number="1000", member_id=1, kind="physical", state="activated")
    upgrade(db.engine)
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT member_id FROM cards")).scalar() == 1
        # Foreign keys are enforced again after the migration.
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.dispose()


def _insert(connection: Any, table: str, **values: Any) -> None:
    """A row with the given values and a zero in every other required column (0 is valid JSON too)."""
    for _, name, _, notnull, default, pk in connection.exec_driver_sql(f"PRAGMA table_info({table})"):
        if notnull and default is None and not pk and name not in values:
            values[name] = 0
    columns = ", ".join(values)
    connection.execute(text(f"INSERT INTO {table} ({columns}) VALUES (:{', :'.join(values)})"), values)
