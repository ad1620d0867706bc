"""Declarative base shared by every domain's tables."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

# Deterministic constraint names so Alembic migrations look the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def import_all_models() -> None:
    """Import every domain's models so ``Base.metadata`` knows all tables."""
    from omniloyal.auth import models as _auth  # noqa: F401
    from omniloyal.catalog import models as _catalog  # noqa: F401
    from omniloyal.events import models as _events  # noqa: F401
    from omniloyal.ledger import models as _ledger  # noqa: F401
    from omniloyal.members import models as _members  # noqa: F401
    from omniloyal.offers import models as _offers  # noqa: F401
    from omniloyal.processing import models as _processing  # noqa: F401
    from omniloyal.segments import models as _segments  # noqa: F401
