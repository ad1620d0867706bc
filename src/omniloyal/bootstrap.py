"""Bring a store to a usable state: schema migrated, default currency present."""

from __future__ import annotations

from sqlalchemy import select

from omniloyal.db import migrate
from omniloyal.db.engine import Database
from omniloyal.ledger.models import Currency
from omniloyal.settings import Settings


def prepare(db: Database, settings: Settings) -> None:
    """Migrates and creates the default currency; safe to run on every start."""
    migrate.upgrade(db.engine)
    with db.transaction() as session:
        if session.scalar(select(Currency).where(Currency.code == settings.default_currency)) is None:
            session.add(Currency(code=settings.default_currency, name="Bonus points", precision=2))
