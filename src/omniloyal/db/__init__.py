"""Operational store: engine, sessions, column types, migrations."""

from omniloyal.db.base import Base
from omniloyal.db.engine import Database

__all__ = ["Base", "Database"]
