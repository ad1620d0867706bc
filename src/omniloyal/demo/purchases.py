"""A year of purchases for the demo retailer, priced by the offers engine, booked in bulk.

Every cheque goes through the pure engine (``offers.engine.calculate``) with the active
offers snapshot, so discounts, write-offs and points are what ``/api/v1/pos`` would give.
What the processing service writes one purchase at a time is written here set-based, a chunk
of members per transaction:

* an ``Operation`` (kind ``purchase``, confirmed) and its ``PurchaseLine`` rows;
* the ledger exactly as ``ledger.service`` writes it: per accrual an entry, a lot and two
  postings (emission -x, member +x); per write-off an entry and two postings per lot spent,
  soonest-expiring lots first; an ``activation`` entry when a delayed lot becomes spendable
  and an ``expiry`` entry (two postings) when a lot expires, at the moment the server's job
  would have done it;
* the offers' counters (``offer_uses``, spent budgets), as ``offers.snapshot.record_use``;
* a ``purchase.confirmed`` envelope per purchase, built by ``processing.events.purchase_confirmed``,
  in the outbox as ``events.outbox.emit_many`` writes it (the payload serialised by Pydantic
  straight to JSON: a fifth of the cost), so the warehouse sink loads the history.

Accruals of one purchase are booked per offer (one lot per offer and currency), where the
processing service books one per line and offer; the points are the same.

Each member's purchases are played in time order with the member's lots in memory, so a
write-off never takes more than was spendable at that moment. Members are independent, so
chunks of members run in parallel processes; each member's random generator is derived from
the seed and the member, and ids are handed out chunk by chunk in order, so the result does
not depend on the number of processes. Afterwards ``ledger.service.run_jobs`` runs at the end
of the period (nothing is left for it to burn: every lot that expired was burnt on time).
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import os
import random
import re
import sys
import time as clock
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, func, select, text, update
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from omniloyal.catalog import service as catalog
from omniloyal.catalog.models import LegalEntity, Product, Stock, Store
from omniloyal.db.engine import Database
from omniloyal.events.envelope import EventEnvelope
from omniloyal.kernel.clock import utcnow
from omniloyal.ledger import service as ledger
from omniloyal.ledger.models import Account, LedgerEntry, Lot
from omniloyal.members.models import Card, Member
from omniloyal.offers import engine
from omniloyal.offers import snapshot as offer_snapshot
from omniloyal.offers.models import Offer
from omniloyal.processing.events import purchase_confirmed
from omniloyal.processing.models import Operation, PurchaseLine

logger = logging.getLogger(__name__)

ZERO = Decimal(0)
CENT = Decimal("0.01")
GRAM = Decimal("0.001")
# Members per chunk (one transaction). Fixed, so ids do not depend on the number of processes.
CHUNK_MEMBERS = 250
# Below this many members, worker processes cost more to start (~3 s) than they save.
PARALLEL_FROM = 4_000

# Shares of the member base by buying habit, and purchases per month for each.
NEVER_SHARE = 0.10
RARE_SHARE = 0.35
RARE_RATE = (0.1, 0.8)
REGULAR_RATE = (1.0, 3.2)
# Online purchases: members with the app buy online more often (about 15% of purchases overall).
ONLINE_SHARE_APP = 0.22
ONLINE_SHARE_WEB = 0.07
APP_SHARE_OF_ONLINE = 0.6
# Weekend trips to a hypermarket, and how often the member's own store is the one.
WEEKEND_HYPERMARKET = 0.45
HOME_STORE = 0.65
# Members with the app who installed it during the period (the others had it already).
APP_INSTALLED_IN_PERIOD = 0.35
# Paying with points: how often a member with at least WRITE_OFF_FROM points spends them.
WRITE_OFF_CHANCE = 0.2
WRITE_OFF_FROM = Decimal(200)
# Monday..Sunday, and the month of the year (1-based index): how busy a day is.
WEEKDAY_WEIGHT = (0.90, 0.90, 0.95, 1.0, 1.15, 1.35, 1.20)
MONTH_WEIGHT = (0.92, 0.88, 1.0, 0.97, 1.02, 0.98, 0.97, 1.0, 0.98, 1.0, 1.03, 1.30)
# Local opening hours 08..22 and how busy each hour is, on workdays and on weekends.
HOURS = tuple(range(8, 23))
WORKDAY_HOURS = (2, 4, 5, 5, 5, 6, 6, 5, 5, 7, 10, 12, 11, 7, 3)
WEEKEND_HOURS = (2, 4, 7, 9, 10, 10, 9, 8, 7, 7, 7, 7, 6, 4, 2)
# Lines per cheque by format: 1 + exponential with this mean, at most 15 (small baskets are
# the most common, big ones rare).
BASKET_LINES = {"Hypermarket": 7.0, "Supermarket": 3.5, "Minimarket": 1.2, "online": 8.0}
MAX_LINES = 15
PAYMENTS_OFFLINE = (("card", 0.68), ("cash", 0.22), ("sbp", 0.10))
PAYMENTS_ONLINE = (("online", 0.88), ("card", 0.08), ("cash", 0.04))
# How much of the catalogue sells, by top category (the rest of the weight is a Zipf rank).
CATEGORY_APPEAL = {
    "Food": 1.0,
    "Drinks": 0.8,
    "Alcohol": 0.3,
    "Household": 0.35,
    "Personal care": 0.3,
    "Baby": 0.2,
    "Pets": 0.25,
    "Home & garden": 0.08,
    "Clothing": 0.05,
}
# Cheaper products sell more: appeal x (PRICE_POINT / price) ** PRICE_ELASTICITY.
PRICE_POINT = 150.0
PRICE_FLOOR = 30.0
PRICE_ELASTICITY = 1.5
# Packaged goods: units bought, mostly one.
_PACKED_UNITS = (1,) * 15 + (2,) * 4 + (3, 4)


# ---------------------------------------------------------------- the world the purchases happen in


@dataclass(frozen=True, slots=True)
class ProductInfo:
    sku: str
    price: Decimal
    cents: int
    category_path: str | None
    brand: str | None
    groups: frozenset[str]
    weighed: bool


@dataclass(frozen=True, slots=True)
class ShopInfo:
    id: int
    code: str
    channel: str
    timezone: str
    attributes: dict[str, Any]
    legal_entity_id: int
    city: str | None
    trade_format: str  # Hypermarket | Supermarket | Minimarket | online
    assortment: tuple[int, ...]  # product indexes
    cum_weights: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class World:
    """Everything a worker needs besides the database: plain, picklable data."""

    seed: int
    start: datetime
    end: datetime
    currency: str
    products: tuple[ProductInfo, ...]
    shops: tuple[ShopInfo, ...]
    city_shops: dict[str, tuple[int, ...]]  # offline shop indexes per city
    city_hypermarkets: dict[str, tuple[int, ...]]
    shop_by_code: dict[str, int]
    online: int | None
    app: int | None
    emission: dict[int, int]  # legal entity id → its emission account
    legal_entities: dict[str, int]  # code → id
    categories: dict[str, str | None]  # sku → category path


@dataclass(slots=True)
class PurchaseStats:
    """What a year of purchases made (summed over chunks)."""

    members: int = 0
    buyers: int = 0
    purchases: int = 0
    lines: int = 0
    online: int = 0
    hypermarket: int = 0
    with_write_off: int = 0
    app_installs: int = 0
    amount: Decimal = ZERO
    discount: Decimal = ZERO
    accrued: Decimal = ZERO
    written_off: Decimal = ZERO
    expired: Decimal = ZERO
    # Where the time went, summed over chunks (wall time in the worker processes, so in parallel
    # their sum exceeds the wall time ``seconds``).
    simulating: float = 0.0
    waiting: float = 0.0  # for the chunk before to take its ids
    writing: float = 0.0
    indexing: float = 0.0  # building the indexes put off until the end (SQLite)
    seconds: float = 0.0

    def add(self, other: PurchaseStats) -> None:
        for f in fields(self):
            if f.name not in ("seconds", "indexing"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _zipf_weights(count: int, rng: random.Random) -> list[float]:
    ranks = list(range(1, count + 1))
    rng.shuffle(ranks)
    return [1.0 / rank**0.8 for rank in ranks]


def load_world(db: Database, *, seed: int, start: datetime, end: datetime, currency: str) -> World:
    """Reads the catalogue the demo made and prepares the emission accounts."""
    rng = random.Random(f"{seed}:catalogue")
    with db.transaction() as session:
        rows = session.execute(
            select(Product.id, Product.sku, Product.unit)
            .where(Product.active.is_(True), Product.price.is_not(None))
            .order_by(Product.id)
        ).all()
        facts = catalog.product_facts(session, [sku for _, sku, _ in rows])
        products: list[ProductInfo] = []
        index_of: dict[int, int] = {}
        for product_id, sku, unit in rows:
            fact = facts[sku]
            assert fact.price is not None
            index_of[product_id] = len(products)
            products.append(
                ProductInfo(
                    sku,
                    fact.price.quantize(CENT),
                    int(fact.price.quantize(CENT) * 100),
                    fact.category_path,
                    fact.brand,
                    fact.groups,
                    unit == "kg",
                )
            )
        # What sells: groceries more than garden chairs, cheap more than dear, a few hits a lot.
        appeal = [
            CATEGORY_APPEAL.get((p.category_path or "").split(" / ")[0], 0.2)
            * z
            * (PRICE_POINT / max(float(p.price), PRICE_FLOOR)) ** PRICE_ELASTICITY
            for p, z in zip(products, _zipf_weights(len(products), rng), strict=True)
        ]
        stocked: dict[int, list[int]] = {}
        for store_id, product_id in session.execute(select(Stock.store_id, Stock.product_id)):
            if product_id in index_of:
                stocked.setdefault(store_id, []).append(index_of[product_id])
        shops: list[ShopInfo] = []
        everything = tuple(range(len(products)))
        for store in session.scalars(select(Store).where(Store.active.is_(True)).order_by(Store.id)):
            attributes = dict(store.attributes or {})
            if store.channel == "offline":
                trade_format = str(attributes.get("CustomTradeFormat", "Supermarket"))
                assortment = tuple(sorted(stocked.get(store.id, ()))) or everything
            else:
                trade_format, assortment = "online", everything
            shops.append(
                ShopInfo(
                    store.id,
                    store.code,
                    store.channel,
                    store.timezone,
                    attributes,
                    store.legal_entity_id,
                    store.city,
                    trade_format,
                    assortment,
                    tuple(accumulate(appeal[i] for i in assortment)),
                )
            )
        city_shops: dict[str, list[int]] = {}
        city_hypers: dict[str, list[int]] = {}
        for n, shop in enumerate(shops):
            if shop.channel == "offline" and shop.city:
                city_shops.setdefault(shop.city, []).append(n)
                if shop.trade_format == "Hypermarket":
                    city_hypers.setdefault(shop.city, []).append(n)
        entities = dict(session.execute(select(LegalEntity.code, LegalEntity.id)).all())
        emission = _emission_accounts(session, list(entities.values()), currency)
    by_code = {shop.code: n for n, shop in enumerate(shops)}
    return World(
        seed=seed,
        start=start,
        end=end,
        currency=currency,
        products=tuple(products),
        shops=tuple(shops),
        city_shops={k: tuple(v) for k, v in city_shops.items()},
        city_hypermarkets={k: tuple(v) for k, v in city_hypers.items()},
        shop_by_code=by_code,
        online=next((n for n, s in enumerate(shops) if s.channel == "online_store"), None),
        app=next((n for n, s in enumerate(shops) if s.channel == "mobile_app"), None),
        emission=emission,
        legal_entities=entities,
        categories={p.sku: p.category_path for p in products},
    )


def _emission_accounts(session: Session, entity_ids: list[int], currency: str) -> dict[int, int]:
    """Each legal entity's emission account (created as ``ledger.service`` would)."""
    found: dict[int | None, int] = {
        entity_id: account_id
        for entity_id, account_id in session.execute(
            select(Account.legal_entity_id, Account.id).where(
                Account.kind == "emission", Account.currency == currency
            )
        )
    }
    for entity_id in entity_ids:
        if entity_id not in found:
            account = Account(
                kind="emission", legal_entity_id=entity_id, currency=currency, created_at=utcnow()
            )
            session.add(account)
            session.flush()
            found[entity_id] = account.id
    return {k: v for k, v in found.items() if k is not None}


# ---------------------------------------------------------------- values as the store keeps them


def _identity(value: Any) -> Any:
    return value


def _sqlite_stamp(value: datetime | None) -> str | None:
    """``importer.sqlite_time`` for the UTC times made here (what ``UTCDateTime`` stores), cheaper."""
    if value is None:
        return None
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


class Codec:
    """Python values → what the DBAPI takes for each column type (the columns' own rules)."""

    def __init__(self, dialect: Dialect) -> None:
        self.sqlite = dialect.name == "sqlite"
        self.mark = "?" if self.sqlite else "%s"
        members = Member.__table__
        assert isinstance(members, Table)
        json_bind = members.c.attributes.type.dialect_impl(dialect).bind_processor(dialect) or _identity
        self.json: Callable[[Any], Any] = json.dumps if self.sqlite else json_bind
        self.time: Callable[[datetime | None], Any] = _sqlite_stamp if self.sqlite else _identity
        self.empty_dict = self.json({})
        self.empty_list = self.json([])
        self._lists: dict[tuple[int, ...], Any] = {}

    def money(self, value: Decimal) -> Any:
        return int(value * 100) if self.sqlite else value

    def points(self, value: Decimal) -> Any:  # ledger amounts keep 4 places
        return int(value * 10000) if self.sqlite else value

    def quantity(self, value: Decimal) -> Any:
        return int(value * 1000) if self.sqlite else value

    def amounts(self, values: dict[str, Decimal]) -> Any:
        """``{"bonus": "12.50"}`` as processing stores it (zero amounts left out)."""
        if self.sqlite and len(values) == 1:
            ((k, v),) = values.items()
            return f'{{"{k}": "{v}"}}' if v else self.empty_dict
        kept = {k: str(v) for k, v in values.items() if v}
        return self.json(kept) if kept else self.empty_dict

    def ids(self, values: Sequence[int]) -> Any:
        key = tuple(values)
        got = self._lists.get(key)
        if got is None:
            got = self._lists[key] = self.json(list(key))
        return got

    def lot_details(self, lot_id: int) -> Any:
        return f'{{"lot_id": {lot_id}}}' if self.sqlite else self.json({"lot_id": lot_id})


def _insert_sql(codec: Codec, table: str, columns: Sequence[str]) -> str:
    marks = ", ".join(codec.mark for _ in columns)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"


_ACCOUNT_COLUMNS = ("id", "kind", "currency", "member_id", "legal_entity_id", "created_at")
_OPERATION_COLUMNS = (
    "id",
    "operation_id",
    "store_id",
    "kind",
    "state",
    "member_id",
    "card_id",
    "cheque_number",
    "cheque_at",
    "amount",
    "discount",
    "write_off",
    "accrual",
    "plan",
    "response",
    "payments",
    "created_at",
    "confirmed_at",
)
_LINE_COLUMNS = (
    "operation_id",
    "line",
    "sku",
    "price",
    "quantity",
    "amount",
    "discount",
    "write_off",
    "bonus",
    "refunded_quantity",
    "offers",
)
_ENTRY_COLUMNS = (
    "id",
    "kind",
    "member_id",
    "currency",
    "amount",
    "reason",
    "source",
    "source_ref",
    "legal_entity_id",
    "actor",
    "details",
    "created_at",
)
_LOT_COLUMNS = (
    "id",
    "account_id",
    "amount",
    "remaining",
    "accrued_at",
    "activates_at",
    "expires_at",
    "entry_id",
    "legal_entity_id",
    "source",
    "closed_at",
    "activation_recorded",
)
_POSTING_COLUMNS = ("entry_id", "account_id", "lot_id", "amount", "created_at")
_EVENT_COLUMNS = (
    "id",
    "type",
    "occurred_at",
    "received_at",
    "member_id",
    "source",
    "store_code",
    "properties",
    "outcome",
)
_USE_COLUMNS = ("offer_id", "member_id", "uses")
_OUTBOX_COLUMNS = ("event_id", "type", "member_id", "payload", "created_at", "attempts")
# The writing connection's SQLite settings (as the member importer's): a bigger page cache for
# the indexes a chunk touches all over, and rarer WAL checkpoints.
# The history can be generated again, so a power cut during it may lose it: no fsync either.
_SQLITE_BULK_PRAGMAS = (
    "PRAGMA cache_size = -131072",
    "PRAGMA wal_autocheckpoint = 65536",
    "PRAGMA synchronous = OFF",
)
_SQLITE_DEFAULT_PRAGMAS = (
    "PRAGMA cache_size = -2000",
    "PRAGMA wal_autocheckpoint = 1000",
    "PRAGMA synchronous = NORMAL",
)


# ---------------------------------------------------------------- ids, handed out in chunk order


class Sequencer:
    """Id ranges for accounts, operations, ledger entries and lots, reserved chunk after chunk.

    Chunks may finish in any order (parallel workers), but chunk k reserves only after chunk
    k-1 did, so every id is the same whatever the number of processes.
    """

    KINDS = 4  # accounts, operations, entries, lots

    def __init__(self, starts: Sequence[int], context: Any = None) -> None:
        self._parallel = context is not None
        if context is None:
            self._values: Any = list(starts)
            self._next: Any = None
            self._failed: Any = None
            self._cond: Any = None
            self._chunk = 0
        else:
            self._values = context.Array("q", list(starts), lock=False)
            self._next = context.Value("q", 0, lock=False)
            self._failed = context.Value("b", 0, lock=False)
            self._cond = context.Condition()

    def reserve(self, chunk: int, counts: Sequence[int]) -> list[int]:
        if not self._parallel:
            assert chunk == self._chunk, "chunks reserve in order"
            bases = list(self._values)
            self._values = [b + c for b, c in zip(bases, counts, strict=True)]
            self._chunk += 1
            return bases
        with self._cond:
            while self._next.value != chunk:
                if self._failed.value:
                    raise RuntimeError("another worker failed")
                self._cond.wait(timeout=1.0)
            bases = [self._values[i] for i in range(self.KINDS)]
            for i in range(self.KINDS):
                self._values[i] = bases[i] + counts[i]
            self._next.value = chunk + 1
            self._cond.notify_all()
            return bases

    def fail(self) -> None:
        if self._parallel:
            with self._cond:
                self._failed.value = 1
                self._cond.notify_all()


# ---------------------------------------------------------------- one member's year


@dataclass(slots=True)
class _Lot:
    local: int
    amount: Decimal
    remaining: Decimal
    accrued_at: datetime
    activates_at: datetime
    expires_at: datetime | None
    legal_entity_id: int
    source: str
    entry: int
    activation_recorded: bool
    closed_at: datetime | None = None


@dataclass(slots=True)
class _MemberRow:
    id: int
    key: str
    registered_at: datetime
    city: str | None
    timezone: str
    attributes: dict[str, Any]
    physical: tuple[int, str, str] | None  # spendable card: id, number, state
    virtual: tuple[int, str, str] | None
    other_card: tuple[int, str, str] | None  # a card not activated yet: earns, cannot spend


class _LineView(NamedTuple):
    """What ``purchase_confirmed`` reads of a purchase line."""

    line: int
    sku: str
    price: Decimal
    quantity: Decimal
    amount: Decimal
    discount: Decimal


@dataclass(slots=True)
class _OperationView:
    """What ``purchase_confirmed`` reads of an operation (the id is set once reserved)."""

    id: int
    operation_id: str
    kind: str
    member_id: int
    cheque_number: str
    cheque_at: datetime
    amount: Decimal
    discount: Decimal
    write_off: dict[str, str]
    accrual: dict[str, str]
    payments: list[dict[str, str]]
    store_code: str = ""
    channel: str = ""
    lines: list[_LineView] = field(default_factory=list)


class _Chunk:
    """The rows one chunk of members makes, with chunk-local ids until they are reserved."""

    def __init__(self, world: World, snapshot: engine.Snapshot, codec: Codec) -> None:
        self.world = world
        self.snapshot = snapshot
        self.codec = codec
        self.stats = PurchaseStats()
        self.accounts: list[list[Any]] = []
        self.operations: list[list[Any]] = []
        self.lines: list[list[Any]] = []
        self.entries: list[list[Any]] = []
        self.lots: list[list[Any]] = []
        self.postings: list[list[Any]] = []
        self.events: list[list[Any]] = []
        self.views: list[_OperationView] = []
        self.details: list[tuple[list[Any], int]] = []  # entries naming a lot: (row, local lot)
        self.lot_count = 0
        self.uses: dict[tuple[int, int], int] = {}
        self.spent_points: dict[int, Decimal] = {}
        self.spent_money: dict[int, Decimal] = {}
        self.zones = {shop.timezone: ZoneInfo(shop.timezone) for shop in world.shops}
        self.hours = {
            False: tuple(accumulate(WORKDAY_HOURS)),
            True: tuple(accumulate(WEEKEND_HOURS)),
        }
        self.day_accept = [
            [w * m / (max(WEEKDAY_WEIGHT) * max(MONTH_WEIGHT)) for w in WEEKDAY_WEIGHT] for m in MONTH_WEIGHT
        ]
        self.app_offer_ids = {chain.offer.id for chain in snapshot.by_event.get("mobile_app_installed", ())}

    # -- ledger rows

    def next_lot(self) -> int:
        self.lot_count += 1
        return self.lot_count - 1

    def entry(
        self,
        kind: str,
        member_id: int,
        amount: Decimal,
        source: str,
        source_ref: str | None,
        reason: str,
        legal_entity_id: int | None,
        at_db: Any,
    ) -> tuple[int, list[Any]]:
        local = len(self.entries)
        row = [
            local,
            kind,
            member_id,
            self.world.currency,
            self.codec.points(amount),
            reason,
            source,
            source_ref,
            legal_entity_id,
            None,
            self.codec.empty_dict,
            at_db,
        ]
        self.entries.append(row)
        return local, row

    def post(self, entry: int, account: int, lot: int, amount: Decimal, at_db: Any) -> None:
        """``account``: a member account's local id (>= 0) or minus an emission account's id."""
        self.postings.append([entry, account, lot, self.codec.points(amount), at_db])


class _MemberBook:
    """One member's lots over the year, and the ledger rows their changes make."""

    def __init__(self, chunk: _Chunk, member: _MemberRow) -> None:
        self.chunk = chunk
        self.member = member
        self.account: int | None = None  # chunk-local
        self.lots: list[_Lot] = []  # open lots, in accrual order
        self.closed: list[_Lot] = []
        self.uses: dict[int, int] = {}

    def account_id(self, at_db: Any) -> int:
        if self.account is None:
            chunk = self.chunk
            self.account = len(chunk.accounts)
            chunk.accounts.append([self.account, "member", chunk.world.currency, self.member.id, None, at_db])
        return self.account

    def catch_up(self, now: datetime) -> None:
        """Activations and expiries due by ``now``, in time order, as the ledger job records them."""
        due: list[tuple[datetime, int, _Lot]] = []
        for lot in self.lots:
            if not lot.activation_recorded and lot.activates_at <= now:
                due.append((lot.activates_at, 0, lot))
            if lot.expires_at is not None and lot.expires_at <= now:
                due.append((lot.expires_at, 1, lot))
        if not due:
            return
        due.sort(key=lambda item: (item[0], item[1], item[2].local))
        chunk = self.chunk
        codec = chunk.codec
        member_id = self.member.id
        for moment, kind, lot in due:
            at_db = codec.time(moment)
            if kind == 0:
                _, row = chunk.entry(
                    "activation",
                    member_id,
                    lot.amount,
                    "activation_job",
                    None,
                    "points became available",
                    lot.legal_entity_id,
                    at_db,
                )
                chunk.details.append((row, lot.local))
                lot.activation_recorded = True
                continue
            value = lot.remaining
            entry, row = chunk.entry(
                "expiry", member_id, -value, "expiry_job", None, "points expired", lot.legal_entity_id, at_db
            )
            chunk.details.append((row, lot.local))
            assert self.account is not None
            chunk.post(entry, self.account, lot.local, -value, at_db)
            chunk.post(entry, -chunk.world.emission[lot.legal_entity_id], lot.local, value, at_db)
            chunk.stats.expired += value
            lot.remaining = ZERO
            lot.closed_at = moment
            self.lots.remove(lot)
            self.closed.append(lot)

    def available(self, now: datetime) -> Decimal:
        return sum((lot.remaining for lot in self.lots if lot.activates_at <= now), ZERO)

    def accrue(
        self,
        amount: Decimal,
        *,
        legal_entity_id: int,
        source: str,
        source_ref: str,
        reason: str,
        at: datetime,
        at_db: Any,
        delay_days: int,
        lifetime_days: int | None,
    ) -> None:
        chunk = self.chunk
        account = self.account_id(at_db)
        entry, _ = chunk.entry(
            "accrual", self.member.id, amount, source, source_ref, reason, legal_entity_id, at_db
        )
        activates = at + timedelta(days=delay_days)
        lot = _Lot(
            local=chunk.next_lot(),
            amount=amount,
            remaining=amount,
            accrued_at=at,
            activates_at=activates,
            expires_at=activates + timedelta(days=lifetime_days) if lifetime_days is not None else None,
            legal_entity_id=legal_entity_id,
            source=source,
            entry=entry,
            activation_recorded=delay_days == 0,
        )
        self.lots.append(lot)
        chunk.post(entry, -chunk.world.emission[legal_entity_id], lot.local, -amount, at_db)
        chunk.post(entry, account, lot.local, amount, at_db)
        chunk.stats.accrued += amount

    def spend(self, amount: Decimal, *, source_ref: str, reason: str, at: datetime, at_db: Any) -> None:
        """A write-off: soonest-expiring active lots first (never-expiring last), as ``ledger._spend``."""
        chunk = self.chunk
        assert self.account is not None
        entry, row = chunk.entry(
            "write_off", self.member.id, -amount, "purchase", source_ref, reason, None, at_db
        )
        active = [lot for lot in self.lots if lot.activates_at <= at]
        active.sort(key=lambda lot: (lot.expires_at is None, lot.expires_at or at, lot.accrued_at, lot.local))
        left = amount
        entities: set[int] = set()
        for lot in active:
            if left <= 0:
                break
            take = min(lot.remaining, left)
            lot.remaining -= take
            chunk.post(entry, self.account, lot.local, -take, at_db)
            chunk.post(entry, -chunk.world.emission[lot.legal_entity_id], lot.local, take, at_db)
            entities.add(lot.legal_entity_id)
            left -= take
            if lot.remaining == 0:
                lot.closed_at = at
                self.lots.remove(lot)
                self.closed.append(lot)
        assert left == 0, "a write-off never takes more than is spendable"
        if len(entities) == 1:
            row[8] = entities.pop()
        chunk.stats.written_off += amount

    def finish(self) -> None:
        """The member's lots as rows, in their final state."""
        chunk = self.chunk
        codec = chunk.codec
        time_ = codec.time
        points = codec.points
        for lot in sorted((*self.closed, *self.lots), key=lambda lot: lot.local):
            assert self.account is not None
            chunk.lots.append(
                [
                    lot.local,
                    self.account,
                    points(lot.amount),
                    points(lot.remaining),
                    time_(lot.accrued_at),
                    time_(lot.activates_at),
                    time_(lot.expires_at),
                    lot.entry,
                    lot.legal_entity_id,
                    lot.source,
                    time_(lot.closed_at),
                    lot.activation_recorded,
                ]
            )


# ---------------------------------------------------------------- the simulation


def _pick(rng: random.Random, choices: Sequence[tuple[str, float]]) -> str:
    draw = rng.random()
    for value, share in choices:
        draw -= share
        if draw < 0:
            return value
    return choices[-1][0]


class _Simulator:
    """Plays each member's period: purchases (and the app installation) in time order."""

    def __init__(self, chunk: _Chunk, packed: dict[tuple[int, int, int], tuple[engine.Line, Any]]) -> None:
        self.chunk = chunk
        self.world = chunk.world
        self.codec = chunk.codec
        self.snapshot = chunk.snapshot
        world = self.world
        self.all_offline = tuple(n for n, s in enumerate(world.shops) if s.channel == "offline")
        # Lines of packaged goods are immutable: the same product bought the same way, at the
        # same line number, is the same line (kept from chunk to chunk).
        self.packed = packed

    # -- when and where

    def _moments(
        self, rng: random.Random, begin: datetime, count: int, zone: ZoneInfo
    ) -> list[tuple[datetime, bool]]:
        """``count`` purchase times in [begin, end): busier weekends, December, evenings."""
        end = self.world.end
        span = (end - begin).total_seconds()
        hours = self.chunk.hours
        accept = self.chunk.day_accept
        found: list[tuple[datetime, bool]] = []
        tries = 0
        while len(found) < count and tries < count * 30:
            tries += 1
            day = (begin + timedelta(seconds=rng.random() * span)).astimezone(zone).date()
            weekday = day.weekday()
            if rng.random() > accept[day.month - 1][weekday]:
                continue
            weekend = weekday >= 5
            cumulative = hours[weekend]
            hour = HOURS[bisect_right(cumulative, rng.random() * cumulative[-1])]
            minute, second = divmod(int(rng.random() * 3600), 60)
            local = datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=zone)
            moment = local.astimezone(UTC)
            if begin <= moment < end:
                found.append((moment, weekend))
        found.sort()
        return found

    def _home(self, member: _MemberRow, rng: random.Random) -> tuple[tuple[int, ...], int]:
        """The member's city stores and their own store (favourite, else one of the city's)."""
        world = self.world
        stores = world.city_shops.get(member.city or "") or self.all_offline
        favourite = world.shop_by_code.get(str(member.attributes.get("favourite_store", "")))
        if favourite is None or world.shops[favourite].channel != "offline":
            favourite = rng.choice(stores)
        return stores, favourite

    # -- one member

    def member(self, member: _MemberRow) -> None:
        world = self.world
        chunk = self.chunk
        chunk.stats.members += 1
        begin = max(world.start, member.registered_at)
        if begin >= world.end:
            return
        rng = random.Random(f"{world.seed}:purchases:{member.key}")
        habit = rng.random()
        if habit < NEVER_SHARE:
            rate = 0.0
        elif habit < NEVER_SHARE + RARE_SHARE:
            rate = rng.uniform(*RARE_RATE)
        else:
            rate = rng.uniform(*REGULAR_RATE)
        expected = rate * (world.end - begin).total_seconds() / 86400 / 30.44
        count = max(0, round(rng.gauss(expected, expected**0.5))) if expected > 0 else 0
        stores, home = self._home(member, rng)
        zone = chunk.zones.get(member.timezone) or ZoneInfo(member.timezone)
        # The app: a virtual card comes with it. Installed on registration, during the period,
        # or before it (no event then).
        install: datetime | None = None
        app_from: datetime | None = None
        if member.virtual is not None and world.app is not None:
            if member.registered_at >= world.start:
                install = member.registered_at + timedelta(minutes=rng.randrange(1, 240))
            elif rng.random() < APP_INSTALLED_IN_PERIOD:
                install = world.start + timedelta(
                    seconds=rng.randrange(int((world.end - world.start).total_seconds()))
                )
            else:
                app_from = world.start
            if install is not None:
                if install >= world.end:
                    install = None
                else:
                    app_from = install
        moments = self._moments(rng, begin, count, zone)
        book = _MemberBook(chunk, member)
        for number, (moment, weekend) in enumerate(moments, 1):
            if install is not None and install <= moment:
                book.catch_up(install)
                self._install(book, install)
                install = None
            book.catch_up(moment)
            app = app_from is not None and moment >= app_from
            self._purchase(book, moment, weekend, number, app, stores, home, rng)
        if install is not None:
            book.catch_up(install)
            self._install(book, install)
        book.catch_up(world.end)
        if moments:
            chunk.stats.buyers += 1
        if book.account is not None:
            book.finish()

    def _facts(
        self, book: _MemberBook, card: tuple[int, str, str] | None, spend: bool, at: datetime | None
    ) -> engine.MemberFacts:
        member = book.member
        available = {self.world.currency: book.available(at)} if at is not None and spend else {}
        return engine.MemberFacts(
            id=member.id,
            card_number=card[1] if card else None,
            card_state=card[2] if card else None,
            can_spend=spend,
            attributes=member.attributes,
            available=available,
            offer_uses=book.uses,
        )

    def _install(self, book: _MemberBook, at: datetime) -> None:
        """The ``mobile_app_installed`` member event, as ``events.service.run_member_event`` runs it."""
        world, chunk, codec = self.world, self.chunk, self.codec
        assert world.app is not None
        shop = world.shops[world.app]
        member = book.member
        card = member.physical or member.virtual
        event_id = f"demo-app-installed-{member.key}"
        result = engine.evaluate_member_event(
            self.snapshot,
            engine.MemberEvent(
                event="mobile_app_installed",
                local_time=engine.local_time(at, chunk.zones[shop.timezone]),
                member=self._facts(book, card, card is not None, None),
                store_code=shop.code,
                channel=shop.channel,
                store_attributes=shop.attributes,
            ),
        )
        at_db = codec.time(at)
        accrued: dict[str, Decimal] = {}
        for accrual in result.accruals:
            if accrual.amount <= 0 or accrual.currency != world.currency:
                continue
            entity = world.legal_entities.get(accrual.legal_entity or "") or shop.legal_entity_id
            book.accrue(
                accrual.amount,
                legal_entity_id=entity,
                source="offer",
                source_ref=f"event:{event_id}",
                reason=f"offer {accrual.offer_id} for mobile_app_installed",
                at=at,
                at_db=at_db,
                delay_days=accrual.activation_delay_days,
                lifetime_days=accrual.lifetime_days,
            )
            accrued[accrual.currency] = accrued.get(accrual.currency, ZERO) + accrual.amount
            chunk.spent_points[accrual.offer_id] = (
                chunk.spent_points.get(accrual.offer_id, ZERO) + accrual.amount
            )
        self._count_uses(book, result.applied_offers)
        chunk.events.append(
            [
                event_id,
                "mobile_app_installed",
                at_db,
                at_db,
                member.id,
                "mobile_app",
                shop.code,
                codec.empty_dict,
                codec.json(
                    {"accrued": {k: str(v) for k, v in accrued.items()}, "offers": result.applied_offers}
                ),
            ]
        )
        chunk.stats.app_installs += 1

    def _count_uses(self, book: _MemberBook, offer_ids: Sequence[int]) -> None:
        uses = self.chunk.uses
        member_id = book.member.id
        for offer_id in set(offer_ids):
            uses[(offer_id, member_id)] = uses.get((offer_id, member_id), 0) + 1
            book.uses[offer_id] = book.uses.get(offer_id, 0) + 1

    def _shop(
        self,
        rng: random.Random,
        weekend: bool,
        app: bool,
        stores: tuple[int, ...],
        home: int,
        city: str | None,
    ) -> int:
        world = self.world
        if world.online is not None and rng.random() < (ONLINE_SHARE_APP if app else ONLINE_SHARE_WEB):
            if app and world.app is not None and rng.random() < APP_SHARE_OF_ONLINE:
                return world.app
            return world.online
        if weekend:
            hypermarkets = world.city_hypermarkets.get(city or "")
            if hypermarkets and rng.random() < WEEKEND_HYPERMARKET:
                return rng.choice(hypermarkets)
        return home if rng.random() < HOME_STORE else rng.choice(stores)

    def _purchase(
        self,
        book: _MemberBook,
        at: datetime,
        weekend: bool,
        number: int,
        app: bool,
        stores: tuple[int, ...],
        home: int,
        rng: random.Random,
    ) -> None:
        world, chunk = self.world, self.chunk
        member = book.member
        shop = world.shops[self._shop(rng, weekend, app, stores, home, member.city)]
        offline = shop.channel == "offline"
        local = engine.local_time(at, chunk.zones[shop.timezone])
        # The basket: 1..15 distinct products of the store's assortment, popular ones more often.
        size = min(MAX_LINES, 1 + int(rng.expovariate(1.0 / BASKET_LINES[shop.trade_format])))
        picks = dict.fromkeys(rng.choices(shop.assortment, cum_weights=shop.cum_weights, k=size))
        products = world.products
        sqlite = self.codec.sqlite
        lines: list[engine.Line] = []
        cells: list[tuple[Any, Any, Any]] = []  # price, quantity, amount as the store keeps them
        total = ZERO
        known = self.packed
        random_ = rng.random
        for n, index in enumerate(picks, 1):
            product = products[index]
            if product.weighed:
                grams = 150 + int(random_() * 2350)
                quantity = Decimal(grams).scaleb(-3)
                amount = (product.price * quantity).quantize(CENT, ROUND_HALF_UP)
                cells.append(
                    (product.cents, grams, int(amount * 100)) if sqlite else (product.price, quantity, amount)
                )
                line = engine.Line(
                    n,
                    product.sku,
                    product.price,
                    quantity,
                    amount,
                    None,
                    product.category_path,
                    product.brand,
                    product.groups,
                )
            else:
                units = _PACKED_UNITS[int(random_() * len(_PACKED_UNITS))]
                key = (index, n, units)
                cached = known.get(key)
                if cached is None:
                    quantity = Decimal(units).quantize(GRAM)
                    amount = product.price * units
                    line = engine.Line(
                        n,
                        product.sku,
                        product.price,
                        quantity,
                        amount,
                        None,
                        product.category_path,
                        product.brand,
                        product.groups,
                    )
                    cell = (
                        (product.cents, units * 1000, product.cents * units)
                        if sqlite
                        else (product.price, quantity, amount)
                    )
                    cached = known[key] = (line, cell)
                line, cell = cached
                amount = line.amount
                cells.append(cell)
            total += amount
            lines.append(line)
        method = _pick(rng, PAYMENTS_OFFLINE if offline else PAYMENTS_ONLINE)
        card = (member.physical or member.virtual) if offline else (member.virtual or member.physical)
        spend = card is not None
        if card is None:  # no activated card: a card not activated yet, or the phone number
            card = member.other_card
        facts = self._facts(book, card, spend, at)
        available = facts.available.get(world.currency, ZERO)
        request = ZERO
        if spend and available >= WRITE_OFF_FROM and rng.random() < WRITE_OFF_CHANCE:
            request = available.to_integral_value(ROUND_FLOOR)
        cheque_number = (
            f"{local.year % 100:02d}{local.month:02d}{local.day:02d}-{1 + int(rng.random() * 9999):04d}"
        )
        result = engine.calculate(
            self.snapshot,
            engine.Cheque(
                local_time=local,
                store_code=shop.code,
                channel=shop.channel,
                store_attributes=shop.attributes,
                lines=tuple(lines),
                payments=(engine.Payment(method, total),),
                member=facts,
                write_off_currency=world.currency if request else None,
                write_off_amount=request,
            ),
        )
        self._book(book, shop, at, number, cheque_number, method, card, lines, cells, result)

    def _book(
        self,
        book: _MemberBook,
        shop: ShopInfo,
        at: datetime,
        number: int,
        cheque_number: str,
        method: str,
        card: tuple[int, str, str] | None,
        lines: list[engine.Line],
        cells: list[tuple[Any, Any, Any]],
        result: engine.Result,
    ) -> None:
        """The confirmed purchase: write-off, accruals, counters, operation, lines, envelope."""
        world, chunk, codec = self.world, self.chunk, self.codec
        member = book.member
        currency = world.currency
        operation_id = f"demo-{member.key}-{number:04d}"
        ref = f"{shop.id}:{operation_id}"  # processing's reservation key: the ledger's source_ref
        at_db = codec.time(at)
        amount = result.amount_total
        discount = result.discount_total
        written = result.write_off.get(currency, ZERO)
        if written:
            book.spend(written, source_ref=ref, reason=f"cheque {cheque_number}", at=at, at_db=at_db)
            chunk.stats.with_write_off += 1
        # Accruals, one lot per offer (what the processing service books line by line).
        grouped: dict[tuple[str, int, int, int | None, str | None], Decimal] = {}
        for accrual in result.accruals:
            if accrual.amount > 0:
                key = (
                    accrual.currency,
                    accrual.offer_id,
                    accrual.activation_delay_days,
                    accrual.lifetime_days,
                    accrual.legal_entity,
                )
                grouped[key] = grouped.get(key, ZERO) + accrual.amount
        plan: list[dict[str, Any]] = []
        accrued = ZERO
        for (cur, offer_id, delay, lifetime, entity), value in grouped.items():
            if cur != currency:
                continue  # the demo offers pay in the default currency only
            book.accrue(
                value,
                legal_entity_id=world.legal_entities.get(entity or "") or shop.legal_entity_id,
                source="purchase",
                source_ref=ref,
                reason=f"offer {offer_id}",
                at=at,
                at_db=at_db,
                delay_days=delay,
                lifetime_days=lifetime,
            )
            accrued += value
            plan.append(
                {
                    "currency": cur,
                    "amount": str(value),
                    "offer_id": offer_id,
                    "activation_delay_days": delay,
                    "lifetime_days": lifetime,
                    "legal_entity": entity,
                    "line": None,
                }
            )
            chunk.spent_points[offer_id] = chunk.spent_points.get(offer_id, ZERO) + value
        # Money each offer gave away: a line's discount split evenly over the offers on it.
        for outcome in result.lines:
            if outcome.discount and outcome.offers:
                share = (outcome.discount / len(outcome.offers)).quantize(CENT)
                for offer_id in outcome.offers:
                    chunk.spent_money[offer_id] = chunk.spent_money.get(offer_id, ZERO) + share
        self._count_uses(book, result.applied_offers)

        to_pay = amount - discount - written
        write_off = {currency: written} if written else {}
        accruals = {currency: accrued} if accrued else {}
        paid = format(to_pay, "f")
        payments = [{"method": method, "amount": paid}]
        # The answer a repeated confirm returns (processing keeps it in ``response``).
        if codec.sqlite:
            confirmation: Any = (
                f'{{"state": "confirmed", "confirmation": {{"operation_id": {json.dumps(operation_id)}, '
                f'"store": {json.dumps(shop.code)}, "state": "confirmed", '
                f'"accrued": {codec.amounts(accruals)}, "written_off": {codec.amounts(write_off)}, '
                f'"balance": []}}}}'
            )
        else:
            confirmation = codec.json(
                {
                    "state": "confirmed",
                    "confirmation": {
                        "operation_id": operation_id,
                        "store": shop.code,
                        "state": "confirmed",
                        "accrued": {k: format(v, "f") for k, v in accruals.items()},
                        "written_off": {k: format(v, "f") for k, v in write_off.items()},
                        "balance": [],
                    },
                }
            )
        local_id = len(chunk.operations)
        money = codec.money
        chunk.operations.append(
            [
                local_id,
                operation_id,
                shop.id,
                "purchase",
                "confirmed",
                member.id,
                card[0] if card else None,
                cheque_number,
                at_db,
                money(amount),
                money(discount),
                codec.amounts(write_off),
                codec.amounts(accruals),
                codec.json({"accruals": plan, "offers": result.applied_offers}),
                confirmation,
                f'[{{"method": "{method}", "amount": "{paid}"}}]' if codec.sqlite else codec.json(payments),
                at_db,
                at_db,
            ]
        )
        zero_quantity = codec.quantity(ZERO)
        zero_money = codec.money(ZERO)
        empty = codec.empty_dict
        amounts = codec.amounts
        ids = codec.ids
        view = _OperationView(
            id=local_id,
            operation_id=operation_id,
            kind="purchase",
            member_id=member.id,
            cheque_number=cheque_number,
            cheque_at=at,
            amount=amount,
            discount=discount,
            write_off={k: str(v) for k, v in write_off.items()},
            accrual={k: str(v) for k, v in accruals.items()},
            payments=payments,
            store_code=shop.code,
            channel=shop.channel,
        )
        append = chunk.lines.append
        views = view.lines
        for line, (price, quantity, amount_db), outcome in zip(lines, cells, result.lines, strict=True):
            cut = outcome.discount
            append(
                [
                    local_id,
                    line.line,
                    line.sku,
                    price,
                    quantity,
                    amount_db,
                    money(cut) if cut else zero_money,
                    amounts(outcome.write_off) if outcome.write_off else empty,
                    amounts(outcome.bonus) if outcome.bonus else empty,
                    zero_quantity,
                    ids(outcome.offers),
                ]
            )
            views.append(_LineView(line.line, line.sku, line.price, line.quantity, line.amount, cut))
        chunk.views.append(view)
        stats = chunk.stats
        stats.purchases += 1
        stats.lines += len(lines)
        stats.amount += amount
        stats.discount += discount
        if shop.channel != "offline":
            stats.online += 1
        elif shop.trade_format == "Hypermarket":
            stats.hypermarket += 1


# ---------------------------------------------------------------- one chunk: simulate, number, write


def _load_members(db: Database, lo: int, hi: int, world: World) -> list[_MemberRow]:
    with db.reading() as session:
        rows = session.execute(
            select(
                Member.id,
                Member.external_id,
                Member.registered_at,
                Member.city,
                Member.timezone,
                Member.attributes,
                Member.first_name,
                Member.last_name,
                Member.gender,
                Member.birth_date,
            )
            .where(Member.id.between(lo, hi))
            .order_by(Member.id)
        ).all()
        cards: dict[int, list[Any]] = {}
        for row in session.execute(
            select(Card.member_id, Card.id, Card.number, Card.kind, Card.state, Card.blocked)
            .where(Card.member_id.between(lo, hi))
            .order_by(Card.id)
        ):
            if row[0] is not None:
                cards.setdefault(row[0], []).append(row)
    zones = {shop.city: shop.timezone for shop in world.shops if shop.city}
    members: list[_MemberRow] = []
    for member_id, external_id, registered_at, city, timezone, attributes, first, last, gender, born in rows:
        physical = virtual = other = None
        for _, card_id, number, kind, state, blocked in cards.get(member_id, ()):
            if state == "activated" and not blocked:
                if kind == "physical" and physical is None:
                    physical = (card_id, number, state)
                elif kind == "virtual" and virtual is None:
                    virtual = (card_id, number, state)
            elif other is None and not blocked and state in ("prepared", "issued"):
                other = (card_id, number, state)  # earns, cannot spend; a blocked card is not shown
        facts = dict(attributes or {})
        facts.update(
            {
                k: v
                for k, v in (
                    ("first_name", first),
                    ("last_name", last),
                    ("gender", gender),
                    ("city", city),
                    ("birth_date", born),
                )
                if v is not None
            }
        )
        members.append(
            _MemberRow(
                id=member_id,
                key=external_id or str(member_id),
                registered_at=registered_at,
                city=city,
                timezone=timezone or zones.get(city or "", "Europe/Moscow"),
                attributes=facts,
                physical=physical,
                virtual=virtual,
                other_card=other,
            )
        )
    return members


def _assign_ids(chunk: _Chunk, bases: Sequence[int]) -> None:
    """Chunk-local ids → the reserved global ones, in place."""
    accounts, operations, entries, lots = bases
    for row in chunk.accounts:
        row[0] += accounts
    for row in chunk.operations:
        row[0] += operations
    for view in chunk.views:
        view.id += operations
    for row in chunk.lines:
        row[0] += operations
    for row in chunk.entries:
        row[0] += entries
    lot_details = chunk.codec.lot_details
    for row, lot in chunk.details:
        row[10] = lot_details(lot + lots)
    for row in chunk.lots:
        row[0] += lots
        row[1] += accounts
        row[7] += entries
    for row in chunk.postings:
        row[0] += entries
        account = row[1]
        row[1] = account + accounts if account >= 0 else -account
        row[2] += lots


def _outbox_rows(codec: Codec, envelopes: Sequence[EventEnvelope]) -> list[tuple[Any, ...]]:
    """The outbox rows ``events.outbox.emit_many`` writes for ``envelopes``: same columns, same
    values; the payload serialised by Pydantic directly (``model_dump_json``), which costs a
    sixth of ``to_json()`` plus the JSON column's ``json.dumps``."""
    now = codec.time(utcnow())
    if codec.sqlite:
        return [(e.id, e.type, e.member_id, e.model_dump_json(), now, 0) for e in envelopes]
    return [(e.id, e.type, e.member_id, codec.json(e.to_json()), now, 0) for e in envelopes]


@dataclass(slots=True)
class Batch:
    """A chunk's rows for one transaction, ids final (picklable: a worker hands it to the writer)."""

    tables: list[tuple[str, Sequence[str], list[Any]]]  # parents before children
    spent: list[tuple[int, Any, Any]]  # offer id, points, money (as the store keeps them)


def _batch(chunk: _Chunk, envelopes: Sequence[EventEnvelope]) -> Batch:
    codec = chunk.codec
    uses = [[o, m, n] for (o, m), n in sorted(chunk.uses.items())]
    return Batch(
        tables=[
            ("accounts", _ACCOUNT_COLUMNS, chunk.accounts),
            ("ledger_entries", _ENTRY_COLUMNS, chunk.entries),
            ("lots", _LOT_COLUMNS, chunk.lots),
            ("postings", _POSTING_COLUMNS, chunk.postings),
            ("operations", _OPERATION_COLUMNS, chunk.operations),
            ("purchase_lines", _LINE_COLUMNS, chunk.lines),
            ("events", _EVENT_COLUMNS, chunk.events),
            ("offer_uses", _USE_COLUMNS, uses),
            ("outbox", _OUTBOX_COLUMNS, _outbox_rows(codec, envelopes)),
        ],
        spent=[
            (
                offer_id,
                codec.money(chunk.spent_points.get(offer_id, ZERO)),
                codec.money(chunk.spent_money.get(offer_id, ZERO)),
            )
            for offer_id in sorted(set(chunk.spent_points) | set(chunk.spent_money))
        ],
    )


def write_batch(db: Database, codec: Codec, batch: Batch) -> None:
    """One transaction: the chunk's rows, then the offers' spent budgets (as
    ``offers.snapshot.record_use``: budgets move, ``updated_at`` stays, no snapshot rebuild)."""
    if codec.sqlite:
        _write_sqlite(db, codec, batch)
        return
    with db.transaction() as session:
        cursor = session.connection().connection.cursor()
        try:
            for table, columns, rows in batch.tables:
                if rows:
                    cursor.executemany(_insert_sql(codec, table, columns), rows)
        finally:
            cursor.close()
        for offer_id, points, money in batch.spent:
            session.execute(
                update(Offer)
                .where(Offer.id == offer_id)
                .values(
                    spent_points=Offer.spent_points + points,
                    spent_money=Offer.spent_money + money,
                    updated_at=Offer.updated_at,
                )
            )


def _write_sqlite(db: Database, codec: Codec, batch: Batch) -> None:
    """The same on SQLite, on a raw connection with foreign key checks off for the transaction:
    every reference is right by construction (ids reserved here, members and stores read from
    the store), and the checks cost a quarter of the inserts' time. One process writes them all
    (see ``_in_workers``): each connection's page cache is dropped whenever another one wrote."""
    raw = db.engine.raw_connection()  # autocommit: the pragma works only outside a transaction
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA foreign_keys = OFF")
        for pragma in _SQLITE_BULK_PRAGMAS:
            cursor.execute(pragma)
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for table, columns, rows in batch.tables:
                if rows:
                    cursor.executemany(_insert_sql(codec, table, columns), rows)
            cursor.executemany(
                "UPDATE offers SET spent_points = spent_points + ?, spent_money = spent_money + ? "
                "WHERE id = ?",
                [(points, money, offer_id) for offer_id, points, money in batch.spent],
            )
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()
    finally:
        raw.close()


# Tables the history fills: their secondary indexes are built once at the end on SQLite.
_FILLED = ("operations", "purchase_lines", "ledger_entries", "lots", "postings", "outbox")


@contextmanager
def _indexes_built_after(db: Database) -> Iterator[None]:
    """On SQLite, drops the secondary indexes of the tables the history fills and builds them
    again when it is written (also when it fails). Millions of inserts at random places of
    big indexes (skus, source refs, expiry times) cost several times the rows themselves once
    the indexes outgrow the page cache; one sort per index at the end costs far less. The
    indexes come back from their own DDL (``sqlite_master``), exactly as the migrations made
    them; unique constraints are kept throughout (SQLite cannot drop those)."""
    if db.dialect != "sqlite":
        yield
        return
    names = ", ".join(f"'{table}'" for table in _FILLED)
    with db.engine.begin() as conn:
        indexes = conn.exec_driver_sql(
            f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            f"AND tbl_name IN ({names}) ORDER BY name"
        ).all()
        for name, _ in indexes:
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
    try:
        yield
    finally:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA cache_size = -131072")  # the sorter's memory
            for _, sql in indexes:
                conn.exec_driver_sql(sql)
            conn.exec_driver_sql("PRAGMA cache_size = -2000")


def _sqlite_defaults(db: Database) -> None:
    """Puts the bulk settings back on the (pooled) connection and folds the WAL into the file."""
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for pragma in (*_SQLITE_DEFAULT_PRAGMAS, "PRAGMA wal_checkpoint(PASSIVE)"):
            cursor.execute(pragma)
        cursor.close()
    finally:
        raw.close()


@dataclass(slots=True)
class _Runner:
    """Plays chunks of members; writes them itself, or hands the rows back (``writes=False``)."""

    world: World
    db: Database
    snapshot: engine.Snapshot
    codec: Codec
    sequencer: Sequencer
    writes: bool = True
    packed: dict[tuple[int, int, int], tuple[engine.Line, Any]] = field(default_factory=dict)

    def run(self, task: tuple[int, int, int]) -> tuple[PurchaseStats, Batch | None]:
        number, lo, hi = task
        # A chunk allocates hundreds of thousands of small lists that live until it is written:
        # the cyclic collector would walk them over and over (a third of the time); they hold
        # no cycles, so it waits until the chunk is done.
        collecting = gc.isenabled()
        gc.disable()
        try:
            started = clock.perf_counter()
            chunk = _Chunk(self.world, self.snapshot, self.codec)
            simulator = _Simulator(chunk, self.packed)
            for member in _load_members(self.db, lo, hi, self.world):
                simulator.member(member)
            simulated = clock.perf_counter()
            bases = self.sequencer.reserve(
                number, (len(chunk.accounts), len(chunk.operations), len(chunk.entries), chunk.lot_count)
            )
            waited = clock.perf_counter() - simulated
            _assign_ids(chunk, bases)
            categories = self.world.categories
            envelopes = [
                purchase_confirmed(
                    cast(Operation, view),
                    cast(Sequence[PurchaseLine], view.lines),
                    store_code=view.store_code,
                    channel=view.channel,
                    categories=categories,
                )
                for view in chunk.views
            ]
            batch = _batch(chunk, envelopes)
            built = clock.perf_counter()
            stats = chunk.stats
            stats.simulating = built - started - waited
            stats.waiting = waited
            if not self.writes:
                return stats, batch
            write_batch(self.db, self.codec, batch)
            stats.writing = clock.perf_counter() - built
            return stats, None
        except BaseException:
            self.sequencer.fail()
            raise
        finally:
            if collecting:
                gc.enable()


_RUNNER: _Runner | None = None


def _start_worker(world: World, url: str, sequencer: Sequencer, writes: bool) -> None:
    global _RUNNER
    db = Database(url)
    with db.reading() as session:
        snapshot = offer_snapshot.active_snapshot(session, world.currency)
    _RUNNER = _Runner(world, db, snapshot, Codec(db.engine.dialect), sequencer, writes)


def _work(task: tuple[int, int, int]) -> tuple[PurchaseStats, Batch | None]:
    assert _RUNNER is not None
    return _RUNNER.run(task)


def _id_starts(session: Session) -> list[int]:
    return [
        int(session.scalar(select(func.coalesce(func.max(column), 0))) or 0) + 1
        for column in (Account.id, Operation.id, LedgerEntry.id, Lot.id)
    ]


def _main_is_guarded() -> bool:
    """Spawned workers re-run the main script: it must keep its work under the ``__main__`` guard
    (console scripts, pytest and ``bench/`` do). Without one, a worker would run the whole
    script again, and the process start would hang or fail."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path:
        return True  # interactive, ``python -c``: nothing is re-run
    try:
        source = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return re.search(r"""if\s+__name__\s*==\s*['"]__main__['"]""", source) is not None


def _in_workers(
    db: Database,
    world: World,
    tasks: list[tuple[int, int, int]],
    starts: list[int],
    processes: int,
    count: Callable[[PurchaseStats], None],
) -> int:
    """Runs the chunks in worker processes (spawned: safe whatever threads this one has).

    On PostgreSQL each worker writes its chunks. On SQLite the workers hand their rows back and
    this process writes them all: writers take turns anyway, and a connection's page cache is
    dropped each time another connection wrote, which would make every chunk read the indexes
    from disk again.
    """
    context = mp.get_context("spawn")
    sequencer = Sequencer(starts, context)
    codec = Codec(db.engine.dialect)
    writes = not codec.sqlite
    pool = ProcessPoolExecutor(
        processes, mp_context=context, initializer=_start_worker, initargs=(world, db.url, sequencer, writes)
    )
    done = 0
    queued = iter(tasks)
    pending: set[Future[tuple[PurchaseStats, Batch | None]]] = set()

    def top_up() -> None:
        # In chunk order, so chunk k is taken only after chunk k-1 (see Sequencer); a few
        # ahead of the writer at most, so finished chunks do not pile up in memory.
        while len(pending) < 2 * processes:
            task = next(queued, None)
            if task is None:
                return
            pending.add(pool.submit(_work, task))

    try:
        top_up()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                pending.discard(future)
                stats, batch = future.result()
                if batch is not None:
                    began = clock.perf_counter()
                    write_batch(db, codec, batch)
                    stats.writing = clock.perf_counter() - began
                count(stats)
                done += 1
            top_up()
    except BaseException:
        sequencer.fail()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if codec.sqlite:
        _sqlite_defaults(db)
    return done


def _run(
    db: Database,
    world: World,
    tasks: list[tuple[int, int, int]],
    starts: list[int],
    processes: int,
    currency: str,
    count: Callable[[PurchaseStats], None],
    total: PurchaseStats,
) -> None:
    """The chunks, in worker processes or in this one."""
    done = 0
    if processes > 1 and not _main_is_guarded():
        logger.warning(
            'the main script has no `if __name__ == "__main__":` guard, which worker processes '
            "need (they re-run it): generating the purchases in-process"
        )
        processes = 1
    if processes > 1:
        try:
            done = _in_workers(db, world, tasks, starts, processes, count)
        except (BrokenProcessPool, BrokenPipeError):
            if total.members:
                raise
            # The workers could not start: do the work here instead.
            logger.warning("worker processes did not start; generating the purchases in-process")
    if done < len(tasks):
        with db.reading() as session:
            snapshot = offer_snapshot.active_snapshot(session, currency)
        runner = _Runner(world, db, snapshot, Codec(db.engine.dialect), Sequencer(starts))
        for task in tasks:
            count(runner.run(task)[0])
        if db.dialect == "sqlite":
            _sqlite_defaults(db)


def generate_purchases(
    db: Database,
    *,
    seed: int,
    end: datetime,
    days: int = 365,
    currency: str = "bonus",
    processes: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> PurchaseStats:
    """Purchases of every member over ``days`` before ``end`` (aware), booked as described above."""
    started = clock.perf_counter()
    start = end - timedelta(days=days)
    world = load_world(db, seed=seed, start=start, end=end, currency=currency)
    with db.reading() as session:
        ids = list(session.scalars(select(Member.id).order_by(Member.id)))
        starts = _id_starts(session)
    tasks = [
        (n, ids[i], ids[min(i + CHUNK_MEMBERS, len(ids)) - 1])
        for n, i in enumerate(range(0, len(ids), CHUNK_MEMBERS))
    ]
    in_memory = db.dialect == "sqlite" and db.engine.url.database in (None, "", ":memory:")
    if processes is None:
        processes = 1 if len(ids) < PARALLEL_FROM else min(2, os.cpu_count() or 1)
    if in_memory:
        processes = 1
    total = PurchaseStats()

    def count(stats: PurchaseStats) -> None:
        total.add(stats)
        if advance is not None:
            advance(stats.members)

    with _indexes_built_after(db):
        _run(db, world, tasks, starts, processes, currency, count, total)
        ran = clock.perf_counter()
    total.indexing = clock.perf_counter() - ran
    if db.dialect == "postgresql":
        with db.transaction() as session:
            for table in ("accounts", "operations", "ledger_entries", "lots"):
                # Ids were given explicitly: move each sequence past them.
                session.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
                    )
                )
    # The expiry job at the end of the period: everything due was burnt on time, so this finds
    # nothing; it is the server's job from here on.
    ledger.run_jobs(db, end)
    total.seconds = clock.perf_counter() - started
    return total


def period_end(today: date) -> datetime:
    """The history ends when ``today`` begins (UTC), so no purchase is in the future."""
    return datetime.combine(today, time(0), UTC)


__all__ = ["PurchaseStats", "generate_purchases", "period_end"]
