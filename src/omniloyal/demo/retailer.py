"""The demo retailer: a Russian grocery chain with stores, a catalogue, members, offers and a
year of purchases.

Everything comes from ``random.Random(seed)``, so the same seed gives the same retailer;
dates are relative to ``today`` (the UTC date by default). Members are written by the
importer's :class:`~omniloyal.members.importer.MemberWriter`, the same bulk path as a file.
The offers are created through the offers service (:mod:`omniloyal.demo.offers`); the
purchases are priced by the offers engine and booked in bulk (:mod:`omniloyal.demo.purchases`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import func, insert, select

from omniloyal.catalog.models import (
    Category,
    LegalEntity,
    PaymentMethod,
    Product,
    ProductBarcode,
    ProductGroup,
    ProductGroupItem,
    Stock,
    Store,
)
from omniloyal.db.engine import Database
from omniloyal.demo import data
from omniloyal.demo.offers import SeedOffers, create_offers
from omniloyal.demo.people import Home, PersonFactory, _ean13
from omniloyal.demo.purchases import PurchaseStats, generate_purchases, period_end
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import Conflict
from omniloyal.members.importer import MemberWriter
from omniloyal.members.models import AttributeDefinition
from omniloyal.members.service import publish_snapshots

PRODUCTS = 5000
MEMBER_BATCH = 5000
# Share of the catalogue a store of each format keeps in stock (the rest: no stock row).
STOCK_SHARE = {"Hypermarket": 0.35, "Supermarket": 0.12, "Minimarket": 0.04}


@dataclass(frozen=True, slots=True)
class StorePlan:
    code: str
    name: str
    city: data.City
    trade_format: str
    address: str
    latitude: float
    longitude: float
    area_m2: int
    has_coffee_shop: bool


def plan_stores(rng: random.Random) -> list[StorePlan]:
    """The offline stores, ~50 in 12 cities, with formats in chain-like proportions."""
    plans: list[StorePlan] = []
    formats = [f[0] for f in data.STORE_FORMATS]
    shares = [f[1] for f in data.STORE_FORMATS]
    details = {f[0]: (f[2], f[3]) for f in data.STORE_FORMATS}
    for city in data.CITIES:
        for n in range(1, city.stores + 1):
            # The first store of a city is its flagship hypermarket in the big cities.
            trade_format = "Hypermarket" if n == 1 and city.stores >= 4 else rng.choices(formats, shares)[0]
            (low, high), coffee = details[trade_format]
            street = rng.choice(data.STREETS)
            plans.append(
                StorePlan(
                    code=f"{city.code}-{n:03d}",
                    name=f"{data.CHAIN} {data.FORMAT_NAMES[trade_format]}, {city.name}, {street}",
                    city=city,
                    trade_format=trade_format,
                    address=f"{city.name}, {street}, д. {rng.randrange(1, 200)}",
                    latitude=round(city.latitude + rng.uniform(-0.08, 0.08), 6),
                    longitude=round(city.longitude + rng.uniform(-0.12, 0.12), 6),
                    area_m2=rng.randrange(low, high) // 10 * 10,
                    has_coffee_shop=rng.random() < coffee,
                )
            )
    return plans


def homes_of(stores: list[StorePlan]) -> list[Home]:
    """Where members live: the chain's cities, weighted by how many stores each has."""
    by_city: dict[str, list[str]] = {}
    for store in stores:
        by_city.setdefault(store.city.code, []).append(store.code)
    return [
        Home(c.name, c.timezone, c.stores * (3 if c.code in ("MSK", "SPB") else 2), tuple(by_city[c.code]))
        for c in data.CITIES
    ]


class _Steps:
    """Rich progress bars when a console is given; silent otherwise."""

    def __init__(self, console: Console | None) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=console is None,
        )

    @contextmanager
    def step(self, description: str, total: int) -> Iterator[Any]:
        task = self.progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            self.progress.advance(task, n)

        yield advance
        self.progress.update(task, completed=total)


@dataclass(frozen=True, slots=True)
class DemoSummary:
    stores: int
    products: int
    members: int
    offers: SeedOffers
    purchases: PurchaseStats | None
    seconds: float


def generate(
    db: Database,
    *,
    members: int,
    seed: int,
    today: date | None = None,
    days: int = 365,
    processes: int | None = None,
    currency: str = "bonus",
    console: Console | None = None,
    quiet: bool = False,
) -> DemoSummary:
    """Loads the demo retailer into an empty store; refuses when stores already exist.

    ``days`` of purchase history end when ``today`` begins (0: no purchases); ``processes``
    is how many worker processes price and book them (default: 2 from 4,000 members).
    """
    started = time.perf_counter()
    if days < 0:
        raise ValueError("days may not be negative")
    with db.reading() as session:
        if session.scalar(select(func.count()).select_from(Store)):
            raise Conflict(
                "store_not_empty",
                "The store already holds a retailer (it has stores): demo data goes into an empty store only",
            )
    rng = random.Random(seed)
    today = today or utcnow().date()
    console = None if quiet else (console or Console(stderr=True))
    steps = _Steps(console)
    with steps.progress:
        with steps.step("stores", 4) as advance:
            plans = plan_stores(rng)
            _stores(db, plans, advance)
        with steps.step("categories", 1) as advance:
            leaves = _categories(db)
            advance()
        with steps.step("products", PRODUCTS) as advance:
            products = _products(db, rng, leaves, advance)
        with steps.step("product groups & stock", len(plans) + 1) as advance:
            _groups(db, rng, products)
            advance()
            _stock(db, rng, plans, products, advance)
        with steps.step("members", members) as advance:
            create_attribute_definitions(db)
            _members(db, rng, plans, members, today, advance)
        with steps.step("offers", 1) as advance:
            offers = create_offers(db, online_entity="DOBRYNYA-ONLINE", online_stores=["ONLINE", "APP"])
            advance()
        history: PurchaseStats | None = None
        if days:
            with steps.step(f"purchases, {days} days", members) as advance:
                history = generate_purchases(
                    db,
                    seed=seed,
                    end=period_end(today),
                    days=days,
                    currency=currency,
                    processes=processes,
                    advance=advance,
                )
        with steps.step("member snapshots for the warehouse", 1) as advance:
            # Members were written on the bulk path: their snapshots reach segments and profiles
            # through the outbox like any other member change.
            publish_snapshots(db)
            advance()
    if console is not None:
        console.print(
            f"[green]demo retailer ready[/green]: {len(plans)} stores + online store + app, "
            f"{len(products):,} products, {members:,} members, 5 offers (seed {seed})"
        )
        if history is not None:
            console.print(
                f"  {history.purchases:,} purchases over {days} days ({history.online:,} online, "
                f"{history.with_write_off:,} paid partly with points) in {history.seconds:.1f} s: "
                f"{history.amount:,.2f} sold, {history.discount:,.2f} discount, "
                f"{history.accrued:,.2f} points earned, {history.written_off:,.2f} spent, "
                f"{history.expired:,.2f} expired"
            )
    return DemoSummary(
        stores=len(plans) + 2,
        products=len(products),
        members=members,
        offers=offers,
        purchases=history,
        seconds=time.perf_counter() - started,
    )


def _stores(db: Database, plans: list[StorePlan], advance: Any) -> None:
    now = utcnow()
    with db.transaction() as session:
        entities = {}
        for code, name, tax_id, default in data.LEGAL_ENTITIES:
            entity = LegalEntity(code=code, name=name, tax_id=tax_id, is_default=default, created_at=now)
            session.add(entity)
            entities[code] = entity
        session.flush()
        advance()
        for plan in plans:
            session.add(
                Store(
                    code=plan.code,
                    name=plan.name,
                    legal_entity_id=entities[plan.city.legal_entity].id,
                    channel="offline",
                    timezone=plan.city.timezone,
                    address=plan.address,
                    city=plan.city.name,
                    region=plan.city.region,
                    latitude=plan.latitude,
                    longitude=plan.longitude,
                    attributes={
                        "CustomTradeFormat": plan.trade_format,
                        "has_coffee_shop": plan.has_coffee_shop,
                        "area_m2": plan.area_m2,
                    },
                    active=True,
                    created_at=now,
                    updated_at=now,
                )
            )
        advance()
        online = entities["DOBRYNYA-ONLINE"].id
        session.add_all(
            [
                Store(
                    code="ONLINE",
                    name=f"{data.CHAIN}: интернет-магазин",
                    legal_entity_id=online,
                    channel="online_store",
                    timezone="Europe/Moscow",
                    attributes={"delivery": True, "pickup": True},
                    created_at=now,
                    updated_at=now,
                ),
                Store(
                    code="APP",
                    name=f"{data.CHAIN}: мобильное приложение",
                    legal_entity_id=online,
                    channel="mobile_app",
                    timezone="Europe/Moscow",
                    attributes={"delivery": True, "pickup": True},
                    created_at=now,
                    updated_at=now,
                ),
            ]
        )
        advance()
        session.add_all(PaymentMethod(code=c, name=n, created_at=now) for c, n in data.PAYMENT_METHODS)
        advance()


def _categories(db: Database) -> list[tuple[int, str, str, str]]:
    """Creates the tree; returns the leaves as (id, path, top level, Russian product noun)."""
    leaves: list[tuple[int, str, str, str]] = []
    with db.transaction() as session:
        for top, sections in data.CATEGORIES.items():
            root = Category(path=top, name=top, parent_id=None, depth=0)
            session.add(root)
            session.flush()
            for section, items in sections.items():
                middle = Category(path=f"{top} / {section}", name=section, parent_id=root.id, depth=1)
                session.add(middle)
                session.flush()
                nodes = [
                    (Category(path=f"{middle.path} / {leaf}", name=leaf, parent_id=middle.id, depth=2), noun)
                    for leaf, noun in items
                ]
                session.add_all(node for node, _ in nodes)
                session.flush()
                leaves.extend((node.id, node.path, top, noun) for node, noun in nodes)
    return leaves


@dataclass(frozen=True, slots=True)
class _Product:
    id: int
    sku: str
    category: str


def _products(
    db: Database, rng: random.Random, leaves: list[tuple[int, str, str, str]], advance: Any
) -> list[_Product]:
    now = utcnow()
    barcodes = iter(range(rng.randrange(10_000_000), 10**9, 7919))  # distinct 9-digit bodies
    rows: list[dict[str, Any]] = []
    codes: list[str] = []
    for n in range(PRODUCTS):
        leaf_id, path, top, noun = leaves[n % len(leaves)] if n < len(leaves) else rng.choice(leaves)
        unit, sizes, (low, high) = data.PACKS[top]
        own = top != "Alcohol" and rng.random() < 0.12
        brand = data.OWN_BRAND if own else rng.choice(data.BRANDS[top])
        leaf = path.rsplit(" / ", 1)[1]
        weighed = leaf in data.WEIGHED_LEAVES
        size = "" if weighed else " " + rng.choice(sizes)
        price = Decimal(rng.randrange(low * 100, high * 100)) / 100
        # Shelf prices end in .90 or .99 more often than not.
        price = price.quantize(Decimal(1)) - Decimal(rng.choice(("0.01", "0.10", "0.10", "0.00")))
        attributes: dict[str, Any] = {"own_brand": own, "country": rng.choice(data.COUNTRIES)}
        if top == "Alcohol":
            attributes["abv"] = rng.choice(("4.5", "5.0", "11.5", "12.0", "13.5", "40.0"))
            attributes["age_restricted"] = True
        if path.startswith("Food / Dairy"):
            attributes["fat_percent"] = rng.choice(("0.5", "1.5", "2.5", "3.2", "5.0", "15.0", "20.0"))
        if rng.random() < 0.08:
            attributes["organic"] = True
        sku = f"{100000 + n}"
        rows.append(
            {
                "sku": sku,
                "name": f"{noun} {brand}{size}",
                "category_id": leaf_id,
                "brand": brand,
                "price": max(price, Decimal("9.90")),
                "unit": "kg" if weighed else unit,
                "attributes": attributes,
                "active": rng.random() > 0.02,
                "created_at": now,
                "updated_at": now,
            }
        )
        codes.append(_ean13(f"460{next(barcodes):09d}"))
    products: list[_Product] = []
    with db.transaction() as session:
        conn = session.connection()
        conn.execute(insert(Product), rows)
        ids = dict(conn.execute(select(Product.sku, Product.id)).all())
        conn.execute(
            insert(ProductBarcode),
            [{"barcode": code, "product_id": ids[row["sku"]]} for row, code in zip(rows, codes, strict=True)],
        )
        paths = {leaf_id: path for leaf_id, path, _, _ in leaves}
        products.extend(_Product(ids[row["sku"]], row["sku"], paths[row["category_id"]]) for row in rows)
    advance(PRODUCTS)
    return products


_RULE_GROUPS = (
    ("DAIRY", "Молочная продукция", {"categories": ["Food / Dairy"]}),
    ("ALCOHOL", "Алкоголь (исключается из акций)", {"categories": ["Alcohol"]}),
    ("OWN_BRAND", "Собственная марка «Добрыня»", {"brands": [data.OWN_BRAND]}),
    ("FRUIT_VEG", "Овощи и фрукты", {"categories": ["Food / Fruit & vegetables"]}),
    ("MEAT_FISH", "Мясо и рыба", {"categories": ["Food / Meat", "Food / Fish & seafood"]}),
    ("COFFEE_TEA", "Чай и кофе", {"categories": ["Drinks / Hot drinks"]}),
    ("SWEETS", "Сладости", {"categories": ["Food / Sweets"]}),
    ("BABY", "Детские товары", {"categories": ["Baby"]}),
    ("PETS", "Зоотовары", {"categories": ["Pets"]}),
    ("HOUSEHOLD_CHEM", "Бытовая химия", {"categories": ["Household / Cleaning", "Household / Laundry"]}),
    ("ORGANIC", "Органические продукты", {"attributes": {"organic": [True]}}),
)
_EXPLICIT_GROUPS = (
    ("WEEKLY_HITS", "Хиты недели", 40),
    ("NEW_ARRIVALS", "Новинки", 30),
    ("PRICE_FREEZE", "Фиксированная цена", 60),
    ("NEW_YEAR", "Новогодний стол", 25),
)


def _groups(db: Database, rng: random.Random, products: list[_Product]) -> None:
    now = utcnow()
    with db.transaction() as session:
        for code, name, rule in _RULE_GROUPS:
            session.add(
                ProductGroup(code=code, name=name, kind="rule", rule=rule, created_at=now, updated_at=now)
            )
        food = [p for p in products if not p.category.startswith("Alcohol")]
        for code, name, size in _EXPLICIT_GROUPS:
            group = ProductGroup(
                code=code, name=name, kind="explicit", rule=None, created_at=now, updated_at=now
            )
            session.add(group)
            session.flush()
            chosen = rng.sample(food if code != "NEW_YEAR" else products, size)
            session.add_all(ProductGroupItem(group_id=group.id, product_id=p.id) for p in chosen)


def _stock(
    db: Database, rng: random.Random, plans: list[StorePlan], products: list[_Product], advance: Any
) -> None:
    now = utcnow()
    with db.transaction() as session:
        conn = session.connection()
        store_ids = dict(conn.execute(select(Store.code, Store.id)).all())
        for plan in plans:
            share = STOCK_SHARE[plan.trade_format]
            chosen = rng.sample(products, int(len(products) * share))
            conn.execute(
                insert(Stock),
                [
                    {
                        "store_id": store_ids[plan.code],
                        "product_id": p.id,
                        "quantity": Decimal(rng.randrange(0, 400)),
                        "updated_at": now,
                    }
                    for p in chosen
                ],
            )
            advance()


def create_attribute_definitions(db: Database) -> None:
    now = utcnow()
    with db.transaction() as session:
        session.add_all(
            [
                AttributeDefinition(
                    code="favourite_store",
                    name="Любимый магазин",
                    type="string",
                    required=False,
                    choices=None,
                    constraints={"max_length": 64},
                    created_at=now,
                ),
                AttributeDefinition(
                    code="has_car",
                    name="Есть автомобиль",
                    type="boolean",
                    required=False,
                    choices=None,
                    constraints={},
                    created_at=now,
                ),
                AttributeDefinition(
                    code="clothing_size",
                    name="Размер одежды",
                    type="enum",
                    required=False,
                    choices=list(data.CLOTHING_SIZES),
                    constraints={},
                    created_at=now,
                ),
            ]
        )


def _members(
    db: Database, rng: random.Random, plans: list[StorePlan], count: int, today: date, advance: Any
) -> None:
    factory = PersonFactory(rng, homes_of(plans), today)
    writer = MemberWriter(db, consent_source="registration")
    for start in range(0, count, MEMBER_BATCH):
        batch = [factory.member(i) for i in range(start, min(start + MEMBER_BATCH, count))]
        outcome = writer.write(batch)
        if outcome.errors:  # generated data is valid by construction: a refusal is a bug here
            first = outcome.errors[0]
            raise RuntimeError(f"demo member {first.external_id} refused: {first.code} {first.message}")
        advance(len(batch))
