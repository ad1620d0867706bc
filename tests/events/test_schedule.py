"""Scheduled jobs: one process per round, due rounds only, failures recorded."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import timedelta

from omniloyal.db.engine import Database
from omniloyal.events import consumers, schedule
from omniloyal.events.bus.memory import MemoryBus
from omniloyal.kernel.clock import utcnow
from omniloyal.settings import Settings


def test_a_round_is_claimed_once_and_only_when_due(db: Database) -> None:
    t0 = utcnow()
    # First seen: the row is made, the first round comes one interval later.
    assert not schedule.claim_run(db, "nightly", 60, now=t0)
    assert not schedule.claim_run(db, "nightly", 60, now=t0 + timedelta(seconds=30))
    assert schedule.claim_run(db, "nightly", 60, now=t0 + timedelta(seconds=61))
    # The same round again (another process a moment later): refused.
    assert not schedule.claim_run(db, "nightly", 60, now=t0 + timedelta(seconds=62))
    schedule.finish_run(db, "nightly", "RuntimeError('warehouse down')")
    row = schedule.last_runs(db)["nightly"]
    assert row.started_at == t0 + timedelta(seconds=61) and row.error == "RuntimeError('warehouse down')"
    assert schedule.claim_run(db, "nightly", 60, now=t0 + timedelta(seconds=122))
    schedule.finish_run(db, "nightly")
    assert schedule.last_runs(db)["nightly"].error is None


def test_two_runtimes_share_the_rounds_and_a_failure_does_not_stop_the_job(
    db: Database, settings: Settings
) -> None:
    runs: list[float] = []
    lock = threading.Lock()

    def job(_settings: Settings, _db: Database) -> object:
        def run() -> None:
            with lock:
                runs.append(time.monotonic())
                first = len(runs) == 1
            if first:
                raise RuntimeError("the first round fails")

        return run

    registry = consumers.Registry()
    registry.register("sink", lambda batch: None)
    registry.register_job("tidy", consumer="sink", interval=lambda s: 0.3, factory=job)
    # A job of a consumer this process does not run is not run here.
    registry.register_job("elsewhere", consumer="other", interval=lambda s: 0.1, factory=job)
    assert not schedule.claim_run(db, "tidy", 0.3)  # seen before: the first round is due at once
    time.sleep(0.35)
    runtimes = [
        consumers.Runtime(settings, db, registry=registry, bus=MemoryBus(), schedule_check=0.05)
        for _ in range(2)
    ]
    for runtime in runtimes:
        runtime.start()
    time.sleep(2.0)
    for runtime in runtimes:
        runtime.stop()
    # About one round per 0.3 s between the two of them, never two in one round.
    assert 3 <= len(runs) <= 8, runs
    assert all(b - a > 0.15 for a, b in itertools.pairwise(runs)), runs
    assert "elsewhere" not in schedule.last_runs(db)
    assert schedule.last_runs(db)["tidy"].error is None  # the later rounds succeeded
