"""Scheduled jobs of the event consumers: work that time alone makes due, not an event.

Segments react to events within seconds, but "no purchase for 30 days" becomes true with no
event at all; RFM recency ages the same way. Such work is a *job* attached to a consumer: the
runtime that runs the consumer (the process holding its warehouse) runs the job every
``interval`` seconds::

    from omniloyal.events import consumers

    consumers.register_job(
        "segments-refresh", consumer="segments",
        interval=lambda settings: settings.segments_refresh_minutes * 60,
        factory=lambda settings, db: lambda: refresh_all(db, get_warehouse(settings)),
    )

Rounds are claimed in the operational store (``scheduled_runs``): whichever process claims a
round runs it, the others skip it, and a restart does not run a job again before it is due. A
failing round is logged and recorded on its row; the next round comes at the next interval.
The first round comes one interval after the job was first seen (not at every start).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from omniloyal.db.engine import Database
from omniloyal.events.models import ScheduledRun
from omniloyal.kernel.clock import utcnow
from omniloyal.settings import Settings

log = logging.getLogger("omniloyal.schedule")

JobFactory = Callable[[Settings, Database], Callable[[], Any]]


@dataclass(frozen=True)
class Job:
    """A scheduled job: ``factory(settings, db)`` builds the callable run each round; it runs
    where ``consumer`` runs, every ``interval(settings)`` seconds (0 or less: never)."""

    name: str
    consumer: str
    interval: Callable[[Settings], float]
    factory: JobFactory


def claim_run(db: Database, name: str, interval: float, now: datetime | None = None) -> bool:
    """True when this caller won the round of ``name`` that is due now (at most one caller per
    round, across processes: a conditional UPDATE of the job's row). A job never seen before
    gets its row and its first round one ``interval`` later."""
    now = now or utcnow()
    with db.transaction() as session:
        claimed = session.execute(
            update(ScheduledRun)
            .where(ScheduledRun.name == name, ScheduledRun.started_at <= now - timedelta(seconds=interval))
            .values(started_at=now, finished_at=None)
            .execution_options(synchronize_session=False)
        )
        if getattr(claimed, "rowcount", 0) == 1:
            return True
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        session.execute(insert(ScheduledRun).values(name=name, started_at=now).on_conflict_do_nothing())
        return False


def finish_run(db: Database, name: str, error: str | None = None, now: datetime | None = None) -> None:
    with db.transaction() as session:
        session.execute(
            update(ScheduledRun)
            .where(ScheduledRun.name == name)
            .values(finished_at=now or utcnow(), error=error[:2000] if error else None)
            .execution_options(synchronize_session=False)
        )


def last_runs(db: Database) -> dict[str, ScheduledRun]:
    """Every job's row (when its last round started and finished, and how it ended)."""
    with db.reading() as session:
        rows = session.scalars(select(ScheduledRun).order_by(ScheduledRun.name)).all()
        for row in rows:
            session.expunge(row)
        return {row.name: row for row in rows}


def run_if_due(db: Database, job: Job, run: Callable[[], Any], interval: float) -> bool:
    """Runs one round of ``job`` if it is due and this process claims it; True if it ran."""
    if not claim_run(db, job.name, interval):
        return False
    try:
        run()
    except Exception as exc:  # recorded on the job's row; the next round comes at the next interval
        log.exception("scheduled job %s failed", job.name)
        finish_run(db, job.name, repr(exc))
        return True
    finish_run(db, job.name)
    log.info("scheduled job %s done", job.name)
    return True
