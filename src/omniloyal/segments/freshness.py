"""The consumer that keeps dynamic segments fresh from the event stream (``segments``).

For each batch of envelopes:

1. the batch is loaded into the warehouse (``analytics.sink.load``: idempotent, so it does not
   matter whether the ``warehouse`` consumer got there first) - the segment queries must see
   the events that changed a membership;
2. the loyalty facts of the members the batch's loyalty events touched are mirrored again
   (balances, cards, status, contact quality), and audiences changed elsewhere are resynced;
3. the touched members are re-evaluated against every active dynamic segment
   (``service.apply_events``): entries and exits are recorded, emitted to the outbox and
   applied to synchronised audiences, and ``refreshed_at`` is stamped; a batch of site and app
   events only (``changed_tables``) re-evaluates the segments that read events, the others are
   only stamped (nothing they read changed);
4. RFM scores of members whose purchases changed are recomputed with the last run's
   boundaries (``rfm.rescore``): a move into another group is an event.

Time passing alone ("no purchase for 30 days") changes no event: the scheduled jobs registered
here catch those where this consumer runs: ``segments-refresh`` (``service.refresh_all`` every
``OMNILOYAL_SEGMENTS_REFRESH_MINUTES``, 15 by default) and ``rfm-recompute`` (every
``OMNILOYAL_RFM_RECOMPUTE_HOURS``, 24); ``omniloyal segments refresh|rfm`` run them by hand.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from omniloyal.analytics import sink
from omniloyal.analytics.warehouse import Warehouse, get_warehouse
from omniloyal.db.engine import Database
from omniloyal.events import tracking
from omniloyal.events.envelope import EventEnvelope
from omniloyal.segments import loyalty, service
from omniloyal.segments import rfm as rfm  # explicit re-import: mypy misses it in the cycle via service

log = logging.getLogger("omniloyal.segments")

CONSUMER_NAME = "segments"
# Events this consumer itself causes: they change no membership.
OWN_PREFIXES = ("segment.", "rfm.")
AUDIENCE_CHANGED = "target_audience.changed"
# Types that only add rows to the warehouse's ``events`` table (or re-own them): see changed_tables.
BEHAVIOUR_TYPES = tracking.WEB_TYPES | {sink.IDENTITY_LINKED}


def handle(db: Database, wh: Warehouse, batch: list[EventEnvelope]) -> None:
    events = [e for e in batch if not e.type.startswith(OWN_PREFIXES)]
    if not events:
        return
    loaded = sink.load(wh, events)
    loyalty_members = {
        e.member_id for e in events if e.member_id is not None and e.type.startswith(loyalty.LOYALTY_PREFIXES)
    }
    loyalty.refresh_members(db, wh, loyalty_members)
    for event in events:
        if event.type == AUDIENCE_CHANGED:
            code = event.properties.get("code")
            if isinstance(code, str) and not loyalty.already_mirrored(code, event.occurred_at):
                loyalty.sync_audience(db, wh, code)
    touched = {e.member_id for e in events if e.member_id is not None} | loaded.members
    service.apply_events(db, wh, sorted(touched), changed=changed_tables(events))
    buyers = {e.member_id for e in events if e.member_id is not None and e.type.startswith("purchase.")}
    if buyers:
        rfm.rescore(db, wh, sorted(buyers))


def changed_tables(events: list[EventEnvelope]) -> frozenset[str] | None:
    """The warehouse tables segments read that this batch changed; None: possibly any.

    Site, app and contact-centre events, message events and identity links (which re-own a
    visitor's events) only add to or re-own rows of ``events`` and move the activity part of
    ``member_features`` (last visits; re-linked members' features are recomputed, their purchase
    sums unchanged); everything else (purchases, points, cards, member data, consents,
    audiences, merges, types not known here) may change any table, so every segment is
    re-evaluated. Unknown means everything: a missed change
    would leave a segment stale, a needless query only costs time."""
    for e in events:
        if e.type not in BEHAVIOUR_TYPES and not e.type.startswith("message."):
            return None
    return frozenset({"events", "member_features"})


def handler_for(db: Database, wh: Warehouse) -> Callable[[list[EventEnvelope]], None]:
    def handler(batch: list[EventEnvelope]) -> None:
        handle(db, wh, batch)

    return handler


def handler_factory(settings: Any, db: Database) -> Callable[[list[EventEnvelope]], None]:
    """The consumer runtime's factory: a handler on the settings' warehouse and ``db``."""
    return handler_for(db, get_warehouse(settings))


def refresh_job(settings: Any, db: Database) -> Callable[[], object]:
    """The scheduled rebuild of every dynamic segment (``segments_refresh_minutes``)."""
    return lambda: service.refresh_all(db, get_warehouse(settings))


def rfm_job(settings: Any, db: Database) -> Callable[[], object]:
    """The scheduled RFM recompute of every member (``rfm_recompute_hours``)."""
    return lambda: rfm.recompute(db, get_warehouse(settings))


def _register() -> None:
    try:
        consumers = importlib.import_module("omniloyal.events.consumers")
    except ImportError:  # no consumer runtime: call handle() directly
        return
    consumers.register_factory(CONSUMER_NAME, handler_factory, types=("#",))
    # Run where the consumer runs: the process that holds the warehouse.
    consumers.register_job(
        "segments-refresh",
        consumer=CONSUMER_NAME,
        interval=lambda settings: settings.segments_refresh_minutes * 60,
        factory=refresh_job,
    )
    consumers.register_job(
        "rfm-recompute",
        consumer=CONSUMER_NAME,
        interval=lambda settings: settings.rfm_recompute_hours * 3600,
        factory=rfm_job,
    )


_register()
