"""Reads what the pure engine needs from the operational store.

* the active offers, compiled once into an engine ``Snapshot`` and rebuilt only when an offer
  changes (a cheap ``count/max(updated_at)`` fingerprint is checked per request, so every
  process sees a marketer's change at its next cheque);
* (a cheque line's category, brand and groups come from ``catalog.service.product_facts``);
* per member: target audiences, how often each offer applied to them, spent budgets.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from omniloyal.ledger.models import Currency
from omniloyal.offers import engine
from omniloyal.offers.models import Offer, OfferStatusChange, OfferUse, TargetAudience, TargetAudienceMember


def rules_of(items: Iterable[Mapping[str, Any]]) -> tuple[engine.Rule, ...]:
    """``{"type": "stores", "attribute": ...}`` → ``Rule("stores", {"attribute": ...})``."""
    return tuple(
        engine.Rule(str(item["type"]), {k: v for k, v in item.items() if k != "type"}) for item in items
    )


def to_engine_offer(row: Offer) -> engine.Offer:
    chains = tuple(
        engine.Chain(
            str(chain["event"]), rules_of(chain.get("filters", ())), rules_of(chain.get("actions", ()))
        )
        for chain in row.chains
    )
    return engine.Offer(
        id=row.id,
        name=row.name,
        chains=chains,
        priority=row.priority,
        summable=row.summable,
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        max_uses_per_member=row.max_uses_per_member,
    )


@dataclass(slots=True)
class _Cached:
    fingerprint: tuple[Any, ...]
    value: Any


class _Cache:
    def __init__(self) -> None:
        self._items: dict[tuple[str, str], _Cached] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], fingerprint: tuple[Any, ...]) -> Any | None:
        with self._lock:
            item = self._items.get(key)
        return item.value if item is not None and item.fingerprint == fingerprint else None

    def put(self, key: tuple[str, str], fingerprint: tuple[Any, ...], value: Any) -> None:
        with self._lock:
            self._items[key] = _Cached(fingerprint, value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _Cache()


def clear_cache() -> None:
    _cache.clear()


def _db_key(session: Session) -> str:
    # One cache per database: tests (and tools) may hold several in one process.
    return str(session.get_bind().engine.url.render_as_string(hide_password=True))


# One statement for the whole fingerprint (a till asks it on every cheque): active offers' count,
# last change and ids, how many of them carry a budget, and the currencies' count and last change.
_FINGERPRINT = select(
    select(func.count(Offer.id)).where(Offer.status == "active").scalar_subquery(),
    select(func.max(Offer.updated_at)).where(Offer.status == "active").scalar_subquery(),
    select(func.sum(Offer.id)).where(Offer.status == "active").scalar_subquery(),
    select(func.count(Offer.id))
    .where(Offer.status == "active", (Offer.budget_points.is_not(None)) | (Offer.budget_money.is_not(None)))
    .scalar_subquery(),
    select(func.count(Currency.code)).scalar_subquery(),
    select(func.max(Currency.created_at)).scalar_subquery(),
)


def _active(session: Session, default_currency: str) -> tuple[engine.Snapshot, bool]:
    """The compiled snapshot and whether any active offer has a budget (cached by fingerprint)."""
    fingerprint = tuple(session.execute(_FINGERPRINT).one())
    key = (_db_key(session), f"offers:{default_currency}")
    cached = _cache.get(key, fingerprint)
    if cached is not None:
        return cached
    rows = session.scalars(select(Offer).where(Offer.status == "active").order_by(Offer.id)).all()
    precision = {code: places for code, places in session.execute(select(Currency.code, Currency.precision))}
    snapshot = engine.Snapshot.build(
        [to_engine_offer(row) for row in rows],
        currency_precision=precision,
        default_currency=default_currency,
    )
    value = (snapshot, bool(fingerprint[3]))
    _cache.put(key, fingerprint, value)
    return value


def active_snapshot(session: Session, default_currency: str = "bonus") -> engine.Snapshot:
    """The compiled snapshot of active offers (cached until an offer or currency changes)."""
    return _active(session, default_currency)[0]


def active_offers(
    session: Session, default_currency: str = "bonus"
) -> tuple[engine.Snapshot, frozenset[int]]:
    """The snapshot and the offers whose budget is spent; budgets are read only if an offer has one."""
    snapshot, budgeted = _active(session, default_currency)
    return snapshot, exhausted_offers(session) if budgeted else frozenset()


def snapshot_at(
    session: Session, moment: datetime, default_currency: str = "bonus"
) -> tuple[engine.Snapshot, frozenset[int]]:
    """Every offer that may have run, and the ids of those active at ``moment`` (from the status
    history), so a cheque replayed later is priced by the offers valid when it was bought."""
    fingerprint = tuple(
        session.execute(
            select(func.count(Offer.id), func.max(Offer.updated_at), func.sum(Offer.id)).where(
                Offer.status != "draft"
            )
        ).one()
    ) + tuple(session.execute(select(func.count(OfferStatusChange.id))).one())
    key = (_db_key(session), "offers_all")
    cached = _cache.get(key, fingerprint)
    if cached is None:
        rows = session.scalars(select(Offer).where(Offer.status != "draft").order_by(Offer.id)).all()
        precision = {
            code: places for code, places in session.execute(select(Currency.code, Currency.precision))
        }
        history: dict[int, list[tuple[datetime, str]]] = {}
        for offer_id, changed_at, new_status in session.execute(
            select(OfferStatusChange.offer_id, OfferStatusChange.at, OfferStatusChange.to_status).order_by(
                OfferStatusChange.at, OfferStatusChange.id
            )
        ):
            history.setdefault(offer_id, []).append((changed_at, new_status))
        snapshot = engine.Snapshot.build(
            [to_engine_offer(row) for row in rows],
            currency_precision=precision,
            default_currency=default_currency,
        )
        current = {row.id: row.status for row in rows}
        cached = (snapshot, history, current)
        _cache.put(key, fingerprint, cached)
    snapshot, history, current = cached
    active: set[int] = set()
    for offer in snapshot.offers:
        changes = history.get(offer.id)
        status: str | None
        if not changes:
            status = current.get(offer.id)  # no recorded history: trust the current status
        else:
            status = None
            for at, to_status in changes:
                if at > moment:
                    break
                status = to_status
        if status == "active":
            active.add(offer.id)
    return snapshot, frozenset(active)


# Prebuilt (tills read them on every cheque): only the parameters change.
_AUDIENCES_OF = (
    select(TargetAudience.code)
    .join(TargetAudienceMember, TargetAudienceMember.audience_id == TargetAudience.id)
    .where(TargetAudienceMember.member_id == bindparam("member_id"))
)
_USES_OF = select(OfferUse.offer_id, OfferUse.uses).where(OfferUse.member_id == bindparam("member_id"))


def member_audiences(session: Session, member_id: int) -> frozenset[str]:
    return frozenset(session.scalars(_AUDIENCES_OF, {"member_id": member_id}))


def member_offer_uses(session: Session, member_id: int) -> dict[int, int]:
    return {offer_id: uses for offer_id, uses in session.execute(_USES_OF, {"member_id": member_id})}


def exhausted_offers(session: Session) -> frozenset[int]:
    """Active offers whose points or money budget is spent (read fresh: it moves with every purchase)."""
    rows = session.execute(
        select(
            Offer.id, Offer.budget_points, Offer.spent_points, Offer.budget_money, Offer.spent_money
        ).where(
            Offer.status == "active", (Offer.budget_points.is_not(None)) | (Offer.budget_money.is_not(None))
        )
    ).all()
    spent: set[int] = set()
    for offer_id, budget_points, spent_points, budget_money, spent_money in rows:
        if (budget_points is not None and spent_points >= budget_points) or (
            budget_money is not None and spent_money >= budget_money
        ):
            spent.add(offer_id)
    return frozenset(spent)


_OFFERS = cast(Table, Offer.__table__)
_OFFER_USES = cast(Table, OfferUse.__table__)
# Only offers with a budget keep a running total: updating the row of every busy offer on every
# purchase would serialise all tills on it. updated_at is kept as it is: budgets moving must not
# rebuild every process's snapshot.
_SPEND_BUDGET = (
    update(_OFFERS)
    .where(
        _OFFERS.c.id == bindparam("offer_id"),
        or_(_OFFERS.c.budget_points.is_not(None), _OFFERS.c.budget_money.is_not(None)),
    )
    .values(
        spent_points=_OFFERS.c.spent_points + bindparam("points", type_=_OFFERS.c.spent_points.type),
        spent_money=_OFFERS.c.spent_money + bindparam("money", type_=_OFFERS.c.spent_money.type),
        updated_at=_OFFERS.c.updated_at,
    )
)
_COUNT_USE = {
    name: insert(_OFFER_USES)
    .values(offer_id=bindparam("offer_id"), member_id=bindparam("member_id"), uses=1)
    .on_conflict_do_update(index_elements=["offer_id", "member_id"], set_={"uses": _OFFER_USES.c.uses + 1})
    for name, insert in (("postgresql", postgresql_insert), ("sqlite", sqlite_insert))
}


def record_use(
    session: Session,
    *,
    offer_ids: Iterable[int],
    member_id: int | None,
    points: Mapping[int, Decimal],
    money: Mapping[int, Decimal],
) -> None:
    """Counts a confirmed application: per-member uses and the offer's spent budget (prebuilt
    statements, one executemany each: this runs on every confirm)."""
    ids = sorted(set(offer_ids))
    if not ids:
        return
    connection = session.connection()
    if member_id is not None:
        statement = _COUNT_USE.get(connection.dialect.name, _COUNT_USE["sqlite"])
        connection.execute(statement, [{"offer_id": i, "member_id": member_id} for i in ids])
    spent = [
        {"offer_id": i, "points": points.get(i, Decimal(0)), "money": money.get(i, Decimal(0))}
        for i in ids
        if points.get(i) or money.get(i)
    ]
    if spent:
        connection.execute(_SPEND_BUDGET, spent)


def local_now(moment: datetime, timezone: str) -> datetime:
    from zoneinfo import ZoneInfo

    return engine.local_time(moment, ZoneInfo(timezone))
