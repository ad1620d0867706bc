"""Ledger use cases (filled in by the ledger work)."""

from __future__ import annotations

from omniloyal.db.engine import Database


def run_jobs(db: Database) -> None:
    """Periodic ledger work: burn expired lots, record activations."""
