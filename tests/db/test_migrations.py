"""The migrations build exactly the schema the models describe, on both stores."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from omniloyal.db.base import Base
from omniloyal.db.engine import Database


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": False}
        )
        differences = compare_metadata(context, Base.metadata)
    # alembic_version is the migration tool's own table, not a model.
    differences = [d for d in differences if "alembic_version" not in repr(d)]
    assert differences == [], f"run `omniloyal migrate --new MESSAGE` to capture: {differences}"
