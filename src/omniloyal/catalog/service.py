"""Catalogue use cases: legal entities, stores, payment methods, products, groups, stock.

Functions taking a ``Database`` open their own transaction; the ``Session`` helpers at the end
(``store_by_code``, ``product_facts``, ``group_skus``...) are for other packages to call inside
theirs. Every admin change writes an audit record in the same transaction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_core import PydanticCustomError
from sqlalchemy import ColumnElement, delete, func, insert, or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from omniloyal.auth.schemas import Principal
from omniloyal.auth.service import record_audit
from omniloyal.catalog.groups import CATEGORY_SEPARATOR, attribute_matches, rule_matches
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
from omniloyal.catalog.schemas import (
    Availability,
    AvailabilityOut,
    BatchError,
    BatchResult,
    CategoryOut,
    GroupCreate,
    GroupOut,
    GroupRule,
    GroupUpdate,
    LegalEntityCreate,
    LegalEntityOut,
    LegalEntityUpdate,
    PaymentMethodCreate,
    PaymentMethodOut,
    ProductBatch,
    ProductFields,
    ProductIn,
    ProductOut,
    ProductPut,
    ProductUpdate,
    StockOut,
    StockPut,
    StockPutResult,
    StoreCreate,
    StoreOut,
    StoreUpdate,
    category_path,
    sku_value,
)
from omniloyal.db import refcache
from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError, Conflict, NotFound, not_found
from omniloyal.kernel.pagination import Page, check_limit, cut, decode_cursor, paginate

T = TypeVar("T")

# Serialises default legal entity changes on PostgreSQL (SQLite writers are serial already).
_DEFAULT_ENTITY_LOCK = 0x0C47_A106
# Rows read per round when a filter runs in Python (store attributes, rule groups).
_SCAN_CHUNK = 500
# Keeps IN (...) lists well under every driver's parameter limit.
_IN_CHUNK = 500
EARTH_RADIUS_KM = 6371.0088


@contextmanager
def _writing(db: Database) -> Iterator[Session]:
    """A transaction whose lost races (a unique key taken meanwhile) become a 409, not a 500."""
    try:
        with db.transaction() as session:
            yield session
    except IntegrityError as exc:
        raise Conflict(
            "concurrent_change", "Another request changed the same records at the same time; retry"
        ) from exc


def _chunks(values: Sequence[T], size: int = _IN_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _snapshot(out: Any) -> dict[str, Any]:
    data: dict[str, Any] = out.model_dump(mode="json")
    data.pop("updated_at", None)
    return data


def _audit_update(
    session: Session, actor: Principal, entity: str, key: str, before: dict[str, Any], after: dict[str, Any]
) -> None:
    """Records only what changed, and nothing if nothing did."""
    changed = [k for k in after if before.get(k) != after.get(k)]
    if changed:
        record_audit(
            session,
            actor,
            "update",
            entity,
            key,
            {k: before.get(k) for k in changed},
            {k: after[k] for k in changed},
        )


def _scan(
    session: Session,
    stmt: Any,
    id_column: InstrumentedAttribute[Any],
    limit: int,
    cursor: str | None,
    keep: Callable[[Any], bool],
    id_of: Callable[[Any], int],
) -> tuple[list[Any], str | None]:
    """Keyset pagination with a filter SQL cannot express the same way on both engines."""
    limit = check_limit(limit)
    last = decode_cursor(cursor) if cursor else None
    kept: list[Any] = []
    while len(kept) <= limit:
        chunk = stmt if last is None else stmt.where(id_column > last)
        rows = list(session.execute(chunk.order_by(id_column).limit(_SCAN_CHUNK)).all())
        for row in rows:
            last = id_of(row)
            if keep(row):
                kept.append(row)
                if len(kept) > limit:
                    break
        if len(rows) < _SCAN_CHUNK:
            break
    return cut(kept, limit, id_of)


def _under(column: Any, path: str) -> ColumnElement[bool]:
    """The category ``path`` or any sub-category; case-sensitive on both engines (no LIKE)."""
    prefix = path + CATEGORY_SEPARATOR
    return or_(column == path, func.substr(column, 1, len(prefix)) == prefix)


def _insert_ignoring(session: Session, model: Any, values: dict[str, Any], key: list[str]) -> None:
    """INSERT that does nothing if the unique ``key`` exists (a concurrent writer got there first)."""
    dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(dialect_insert(model).values(**values).on_conflict_do_nothing(index_elements=key))


# Legal entities


def _entity_out(entity: LegalEntity) -> LegalEntityOut:
    return LegalEntityOut.model_validate(entity, from_attributes=True)


def _lock_default_entity(session: Session) -> LegalEntity | None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DEFAULT_ENTITY_LOCK})
    return session.scalar(select(LegalEntity).where(LegalEntity.is_default.is_(True)))


def _unset_default(session: Session, actor: Principal, current: LegalEntity) -> None:
    current.is_default = False
    session.flush()  # before the new default is written: the unique index allows only one
    record_audit(
        session, actor, "update", "legal_entity", current.code, {"is_default": True}, {"is_default": False}
    )


def create_legal_entity(db: Database, data: LegalEntityCreate, actor: Principal) -> LegalEntityOut:
    with _writing(db) as session:
        if session.scalar(select(LegalEntity.id).where(LegalEntity.code == data.code)) is not None:
            raise Conflict("duplicate_code", f"Legal entity {data.code!r} already exists", field="code")
        current = _lock_default_entity(session)
        # The first legal entity is the default whatever was asked: there must always be one.
        make_default = data.is_default or current is None
        if make_default and current is not None:
            _unset_default(session, actor, current)
        entity = LegalEntity(
            code=data.code, name=data.name, tax_id=data.tax_id, is_default=make_default, created_at=utcnow()
        )
        session.add(entity)
        session.flush()
        out = _entity_out(entity)
        record_audit(session, actor, "create", "legal_entity", entity.code, None, _snapshot(out))
        return out


def _entity_by_code(session: Session, code: str, *, field: str | None = None) -> LegalEntity:
    entity = session.scalar(select(LegalEntity).where(LegalEntity.code == code))
    if entity is None:
        raise not_found("legal_entity", code, field=field)
    return entity


def get_legal_entity(db: Database, code: str) -> LegalEntityOut:
    with db.reading() as session:
        return _entity_out(_entity_by_code(session, code))


def list_legal_entities(db: Database, limit: int, cursor: str | None) -> Page[LegalEntityOut]:
    with db.reading() as session:
        stmt, limit = paginate(select(LegalEntity), LegalEntity.id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        return Page[LegalEntityOut](items=[_entity_out(e) for e in rows], next_cursor=next_cursor)


def update_legal_entity(db: Database, code: str, data: LegalEntityUpdate, actor: Principal) -> LegalEntityOut:
    given = data.model_fields_set
    with _writing(db) as session:
        entity = _entity_by_code(session, code)
        before = _snapshot(_entity_out(entity))
        if "is_default" in given and data.is_default != entity.is_default:
            if not data.is_default:
                raise Conflict(
                    "default_required",
                    "There is always one default legal entity: make another one the default instead",
                    field="is_default",
                )
            current = _lock_default_entity(session)
            if current is not None and current.id != entity.id:
                _unset_default(session, actor, current)
            entity.is_default = True
        if "name" in given and data.name is not None:
            entity.name = data.name
        if "tax_id" in given:
            entity.tax_id = data.tax_id
        session.flush()
        out = _entity_out(entity)
        _audit_update(session, actor, "legal_entity", entity.code, before, _snapshot(out))
        return out


# Stores


def _store_out(store: Store, legal_entity_code: str) -> StoreOut:
    return StoreOut(
        id=store.id,
        code=store.code,
        name=store.name,
        legal_entity=legal_entity_code,
        channel=store.channel,
        timezone=store.timezone,
        address=store.address,
        city=store.city,
        region=store.region,
        latitude=store.latitude,
        longitude=store.longitude,
        attributes=dict(store.attributes or {}),
        active=store.active,
        created_at=store.created_at,
        updated_at=store.updated_at,
    )


def _check_coordinates(latitude: float | None, longitude: float | None) -> None:
    if (latitude is None) != (longitude is None):
        raise AppError(
            "incomplete_coordinates",
            "Give both latitude and longitude, or neither",
            field="longitude" if longitude is None else "latitude",
        )


def _store_entity(session: Session, code: str | None) -> LegalEntity:
    if code is not None:
        return _entity_by_code(session, code, field="legal_entity")
    entity = session.scalar(select(LegalEntity).where(LegalEntity.is_default.is_(True)))
    if entity is None:
        raise AppError(
            "legal_entity_required", "No legal entity exists yet: create one first", field="legal_entity"
        )
    return entity


def create_store(db: Database, data: StoreCreate, actor: Principal, default_timezone: str) -> StoreOut:
    with _writing(db) as session:
        if session.scalar(select(Store.id).where(Store.code == data.code)) is not None:
            raise Conflict("duplicate_code", f"Store {data.code!r} already exists", field="code")
        entity = _store_entity(session, data.legal_entity)
        _check_coordinates(data.latitude, data.longitude)
        now = utcnow()
        store = Store(
            code=data.code,
            name=data.name,
            legal_entity_id=entity.id,
            channel=data.channel,
            timezone=data.timezone or default_timezone,
            address=data.address,
            city=data.city,
            region=data.region,
            latitude=data.latitude,
            longitude=data.longitude,
            attributes=data.attributes,
            active=True,
            created_at=now,
            updated_at=now,
        )
        session.add(store)
        session.flush()
        out = _store_out(store, entity.code)
        record_audit(session, actor, "create", "store", store.code, None, _snapshot(out))
        return out


def _store_row(session: Session, code: str) -> tuple[Store, str]:
    row = session.execute(
        select(Store, LegalEntity.code)
        .join(LegalEntity, LegalEntity.id == Store.legal_entity_id)
        .where(Store.code == code)
    ).first()
    if row is None:
        raise not_found("store", code)
    return row[0], row[1]


def get_store(db: Database, code: str) -> StoreOut:
    with db.reading() as session:
        return _store_out(*_store_row(session, code))


def parse_attribute_filters(filters: Iterable[str]) -> list[tuple[str, str]]:
    """``["CustomTradeFormat:Hypermarket"]`` → ``[("CustomTradeFormat", "Hypermarket")]``."""
    parsed = []
    for item in filters:
        name, colon, value = item.partition(":")
        if not colon or not name.strip():
            raise AppError(
                "invalid_attribute_filter", f"{item!r}: write the filter as Name:Value", field="attribute"
            )
        parsed.append((name.strip(), value))
    return parsed


def list_stores(
    db: Database,
    limit: int,
    cursor: str | None,
    *,
    channel: str | None = None,
    legal_entity: str | None = None,
    city: str | None = None,
    active: bool | None = None,
    attributes: Sequence[str] = (),
) -> Page[StoreOut]:
    wanted = parse_attribute_filters(attributes)
    with db.reading() as session:
        stmt = select(Store, LegalEntity.code).join(LegalEntity, LegalEntity.id == Store.legal_entity_id)
        if channel is not None:
            stmt = stmt.where(Store.channel == channel)
        if legal_entity is not None:
            stmt = stmt.where(
                Store.legal_entity_id == _entity_by_code(session, legal_entity, field="legal_entity").id
            )
        if city is not None:
            stmt = stmt.where(Store.city == city)
        if active is not None:
            stmt = stmt.where(Store.active.is_(active))

        def keep(row: Any) -> bool:
            attrs = row[0].attributes or {}
            return all(attribute_matches(attrs.get(name), (value,)) for name, value in wanted)

        rows, next_cursor = _scan(session, stmt, Store.id, limit, cursor, keep, lambda r: r[0].id)
        return Page[StoreOut](items=[_store_out(s, e) for s, e in rows], next_cursor=next_cursor)


def update_store(db: Database, code: str, data: StoreUpdate, actor: Principal) -> StoreOut:
    given = data.model_fields_set
    with _writing(db) as session:
        store, entity_code = _store_row(session, code)
        before = _snapshot(_store_out(store, entity_code))
        if "legal_entity" in given and data.legal_entity is not None:
            entity = _entity_by_code(session, data.legal_entity, field="legal_entity")
            store.legal_entity_id, entity_code = entity.id, entity.code
        for name in ("name", "channel", "timezone", "attributes", "active"):
            if name in given and getattr(data, name) is not None:
                setattr(store, name, getattr(data, name))
        for name in ("address", "city", "region", "latitude", "longitude"):
            if name in given:
                setattr(store, name, getattr(data, name))
        _check_coordinates(store.latitude, store.longitude)
        after = _snapshot(_store_out(store, entity_code))
        if after != before:
            store.updated_at = utcnow()
        session.flush()
        _audit_update(session, actor, "store", store.code, before, after)
        return _store_out(store, entity_code)


# Payment methods


def create_payment_method(db: Database, data: PaymentMethodCreate, actor: Principal) -> PaymentMethodOut:
    with _writing(db) as session:
        if session.scalar(select(PaymentMethod.id).where(PaymentMethod.code == data.code)) is not None:
            raise Conflict("duplicate_code", f"Payment method {data.code!r} already exists", field="code")
        method = PaymentMethod(code=data.code, name=data.name, created_at=utcnow())
        session.add(method)
        session.flush()
        out = PaymentMethodOut.model_validate(method, from_attributes=True)
        record_audit(session, actor, "create", "payment_method", method.code, None, _snapshot(out))
        return out


def get_payment_method(db: Database, code: str) -> PaymentMethodOut:
    with db.reading() as session:
        method = session.scalar(select(PaymentMethod).where(PaymentMethod.code == code))
        if method is None:
            raise not_found("payment_method", code)
        return PaymentMethodOut.model_validate(method, from_attributes=True)


def list_payment_methods(db: Database, limit: int, cursor: str | None) -> Page[PaymentMethodOut]:
    with db.reading() as session:
        stmt, limit = paginate(select(PaymentMethod), PaymentMethod.id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        return Page[PaymentMethodOut](
            items=[PaymentMethodOut.model_validate(m, from_attributes=True) for m in rows],
            next_cursor=next_cursor,
        )


# Products


@dataclass
class _State:
    """What a product says, independent of the tables it is stored in."""

    name: str
    price: Decimal | None
    category: str | None
    brand: str | None
    barcodes: list[str]
    unit: str
    attributes: dict[str, Any]
    active: bool


def _product_out(product: Product, category: str | None, barcodes: Iterable[str]) -> ProductOut:
    return ProductOut(
        id=product.id,
        sku=product.sku,
        name=product.name,
        price=product.price,
        category=category,
        brand=product.brand,
        barcodes=sorted(barcodes),
        unit=product.unit,
        attributes=dict(product.attributes or {}),
        active=product.active,
        created_at=product.created_at,
        updated_at=product.updated_at,
    )


class _ProductWriter:
    """Upserts products in one transaction with few queries: products, barcodes and categories
    touched are read once up front and kept current in memory as items are applied in order.
    An item is checked completely before anything is written, so a refused item changes nothing."""

    def __init__(
        self, session: Session, actor: Principal, skus: Sequence[str], barcodes: Iterable[str]
    ) -> None:
        self.session = session
        self.actor = actor
        self.products: dict[str, Product] = {}
        self.paths: dict[str, str | None] = {}  # sku -> category path
        self.barcodes: dict[str, set[str]] = {}  # sku -> its barcodes
        self.owner: dict[str, str] = {}  # barcode -> sku
        self.category_ids: dict[str, int] = {}
        unique_skus = list(dict.fromkeys(skus))
        for part in _chunks(unique_skus):
            rows = session.execute(
                select(Product, Category.path)
                .outerjoin(Category, Category.id == Product.category_id)
                .where(Product.sku.in_(part))
            ).all()
            for product, path in rows:
                self.products[product.sku] = product
                self.paths[product.sku] = path
                self.barcodes[product.sku] = set()
        ids = [p.id for p in self.products.values()]
        wanted = list(dict.fromkeys(barcodes))
        conditions = [ProductBarcode.product_id.in_(p) for p in _chunks(ids)]
        conditions += [ProductBarcode.barcode.in_(p) for p in _chunks(wanted)]
        for condition in conditions:
            for barcode, sku in session.execute(
                select(ProductBarcode.barcode, Product.sku)
                .join(Product, Product.id == ProductBarcode.product_id)
                .where(condition)
            ):
                self.owner[barcode] = sku
                if sku in self.barcodes:
                    self.barcodes[sku].add(barcode)

    def state(self, sku: str) -> _State | None:
        product = self.products.get(sku)
        if product is None:
            return None
        return _State(
            name=product.name,
            price=product.price,
            category=self.paths[sku],
            brand=product.brand,
            barcodes=sorted(self.barcodes[sku]),
            unit=product.unit,
            attributes=dict(product.attributes or {}),
            active=product.active,
        )

    def out(self, sku: str) -> ProductOut:
        return _product_out(self.products[sku], self.paths[sku], self.barcodes[sku])

    def _category_id(self, path: str) -> int:
        names = path.split(CATEGORY_SEPARATOR)
        parent_id: int | None = None
        for depth in range(len(names)):
            prefix = CATEGORY_SEPARATOR.join(names[: depth + 1])
            known = self.category_ids.get(prefix)
            if known is None:
                known = self.session.scalar(select(Category.id).where(Category.path == prefix))
            if known is None:
                values = {"path": prefix, "name": names[depth], "parent_id": parent_id, "depth": depth}
                _insert_ignoring(self.session, Category, values, ["path"])
                known = self.session.scalar(select(Category.id).where(Category.path == prefix))
            assert known is not None
            self.category_ids[prefix] = parent_id = known
        assert parent_id is not None
        return parent_id

    def apply(self, sku: str, target: _State, *, field_prefix: str = "") -> tuple[ProductOut, str]:
        """Makes product ``sku`` say ``target``; returns it and "created", "updated" or "unchanged"."""
        for i, barcode in enumerate(target.barcodes):
            owner = self.owner.get(barcode)
            if owner is not None and owner != sku:
                raise Conflict(
                    "duplicate_barcode",
                    f"Barcode {barcode!r} already belongs to product {owner!r}",
                    field=f"{field_prefix}barcodes.{i}",
                    details={"barcode": barcode, "sku": owner},
                )
        current = self.state(sku)
        if current is not None and _same(current, target):
            return self.out(sku), "unchanged"
        category_id = self._category_id(target.category) if target.category else None
        now = utcnow()
        product = self.products.get(sku)
        before = _snapshot(self.out(sku)) if product is not None else None
        if product is None:
            product = Product(sku=sku, created_at=now)
            self.session.add(product)
            self.products[sku] = product
            self.barcodes[sku] = set()
        product.name = target.name
        product.price = target.price
        product.category_id = category_id
        product.brand = target.brand
        product.unit = target.unit
        product.attributes = target.attributes
        product.active = target.active
        product.updated_at = now
        self.paths[sku] = target.category
        self.session.flush()  # the new product's id, for its barcodes
        old, new = self.barcodes[sku], set(target.barcodes)
        if old - new:
            self.session.execute(delete(ProductBarcode).where(ProductBarcode.barcode.in_(sorted(old - new))))
        if new - old:
            self.session.execute(
                insert(ProductBarcode), [{"barcode": b, "product_id": product.id} for b in sorted(new - old)]
            )
        for barcode in old - new:
            self.owner.pop(barcode, None)
        for barcode in new:
            self.owner[barcode] = sku
        self.barcodes[sku] = new
        out = self.out(sku)
        if before is None:
            record_audit(self.session, self.actor, "create", "product", sku, None, _snapshot(out))
            return out, "created"
        _audit_update(self.session, self.actor, "product", sku, before, _snapshot(out))
        return out, "updated"


def _same(current: _State, target: _State) -> bool:
    # Prices compare as numbers (10.5 == 10.50); the rest as stored.
    return current == _State(**{**target.__dict__, "barcodes": sorted(target.barcodes)})


def _target(data: ProductFields) -> _State:
    return _State(
        name=data.name,
        price=data.price,
        category=data.category,
        brand=data.brand,
        barcodes=list(data.barcodes),
        unit=data.unit,
        attributes=data.attributes,
        active=data.active,
    )


def create_product(db: Database, data: ProductIn, actor: Principal) -> ProductOut:
    with _writing(db) as session:
        writer = _ProductWriter(session, actor, [data.sku], data.barcodes)
        if data.sku in writer.products:
            raise Conflict(
                "duplicate_sku", f"Product {data.sku!r} already exists; PUT replaces it", field="sku"
            )
        return writer.apply(data.sku, _target(data))[0]


def put_product(db: Database, sku: str, data: ProductPut, actor: Principal) -> tuple[ProductOut, bool]:
    """Creates or replaces the product; returns it and whether it was created."""
    if data.sku is not None and data.sku != sku:
        raise AppError(
            "sku_mismatch", f"The body's sku {data.sku!r} differs from the path's {sku!r}", field="sku"
        )
    try:
        sku_value(sku)  # the path's sku follows the body's rules
    except PydanticCustomError as exc:
        raise AppError("invalid_sku", exc.message(), field="sku") from exc
    with _writing(db) as session:
        writer = _ProductWriter(session, actor, [sku], data.barcodes)
        out, outcome = writer.apply(sku, _target(data))
        return out, outcome == "created"


def update_product(db: Database, sku: str, data: ProductUpdate, actor: Principal) -> ProductOut:
    given = data.model_fields_set
    with _writing(db) as session:
        writer = _ProductWriter(session, actor, [sku], data.barcodes or ())
        target = writer.state(sku)
        if target is None:
            raise not_found("product", sku)
        for name in ("name", "barcodes", "unit", "attributes", "active"):
            if name in given and getattr(data, name) is not None:
                setattr(target, name, getattr(data, name))
        for name in ("price", "category", "brand"):
            if name in given:
                setattr(target, name, getattr(data, name))
        return writer.apply(sku, target)[0]


_PYDANTIC_CODES = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "literal_error": "invalid_choice",
    "enum": "invalid_choice",
}


def _validation_error(index: int, exc: ValidationError) -> BatchError:
    """The same code and field a single request would get as a 422 (see ``app._validation_response``)."""
    first = exc.errors()[0]
    kind = str(first["type"])
    code = _PYDANTIC_CODES.get(kind, kind if "_" in kind and kind.islower() else "invalid_value")
    if kind in {"value_error", "assertion_error"} or "." in kind:
        code = "invalid_value"
    field = ".".join(str(p) for p in first["loc"]) or None
    return BatchError(
        index=index, code=code, message=str(first["msg"]).removeprefix("Value error, "), field=field
    )


def upsert_products(db: Database, batch: ProductBatch, actor: Principal) -> BatchResult:
    """Creates or replaces products by sku, in order, in one transaction; refused items are
    reported with their index and the others kept."""
    errors: list[BatchError] = []
    valid: list[tuple[int, ProductIn]] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(batch.items):
        if not isinstance(raw, dict):
            errors.append(
                BatchError(
                    index=index, code="invalid_item", message="An item is a product object", field=None
                )
            )
            continue
        try:
            item = ProductIn.model_validate(raw)
        except ValidationError as exc:
            errors.append(_validation_error(index, exc))
            continue
        if item.sku in seen:
            errors.append(
                BatchError(
                    index=index,
                    code="duplicate_in_batch",
                    message=f"Product {item.sku!r} already came at index {seen[item.sku]} of this batch",
                    field="sku",
                )
            )
            continue
        seen[item.sku] = index
        valid.append((index, item))
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    with _writing(db) as session:
        writer = _ProductWriter(
            session, actor, [item.sku for _, item in valid], [b for _, item in valid for b in item.barcodes]
        )
        for index, item in valid:
            try:
                _, outcome = writer.apply(item.sku, _target(item))
            except AppError as exc:
                errors.append(BatchError(index=index, code=exc.code, message=exc.message, field=exc.field))
                continue
            counts[outcome] += 1
    errors.sort(key=lambda e: e.index)
    return BatchResult(accepted=sum(counts.values()), errors=errors, **counts)


def _outs(session: Session, rows: Sequence[tuple[Product, str | None]]) -> list[ProductOut]:
    """Products with their category paths → outputs, loading all their barcodes in one query."""
    barcodes: dict[int, list[str]] = {}
    for part in _chunks([p.id for p, _ in rows]):
        for barcode, product_id in session.execute(
            select(ProductBarcode.barcode, ProductBarcode.product_id).where(
                ProductBarcode.product_id.in_(part)
            )
        ):
            barcodes.setdefault(product_id, []).append(barcode)
    return [_product_out(p, path, barcodes.get(p.id, ())) for p, path in rows]


def _products() -> Any:
    """Products with their category path (None without a category)."""
    return select(Product, Category.path).outerjoin(Category, Category.id == Product.category_id)


def get_product(db: Database, sku: str) -> ProductOut:
    with db.reading() as session:
        row = session.execute(_products().where(Product.sku == sku)).first()
        if row is None:
            raise not_found("product", sku)
        return _outs(session, [(row[0], row[1])])[0]


def lookup_barcode(db: Database, barcode: str) -> ProductOut:
    with db.reading() as session:
        row = session.execute(
            _products()
            .join(ProductBarcode, ProductBarcode.product_id == Product.id)
            .where(ProductBarcode.barcode == barcode.strip())
        ).first()
        if row is None:
            raise NotFound("unknown_barcode", f"No product has barcode {barcode!r}", field="barcode")
        return _outs(session, [(row[0], row[1])])[0]


def _category_filter(value: str) -> str:
    try:
        return category_path(value)
    except PydanticCustomError as exc:
        raise AppError("invalid_category", exc.message(), field="category") from exc


def list_products(
    db: Database,
    limit: int,
    cursor: str | None,
    *,
    category: str | None = None,
    brand: str | None = None,
    q: str | None = None,
    active: bool | None = None,
) -> Page[ProductOut]:
    with db.reading() as session:
        stmt = _products()
        if category is not None:
            stmt = stmt.where(_under(Category.path, _category_filter(category)))
        if brand is not None:
            stmt = stmt.where(Product.brand == brand)
        if q:
            # Substring match, case-insensitive (ASCII only on SQLite).
            pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            stmt = stmt.where(Product.name.ilike(pattern, escape="\\"))
        if active is not None:
            stmt = stmt.where(Product.active.is_(active))
        stmt, limit = paginate(stmt, Product.id, limit, cursor)
        rows, next_cursor = cut(list(session.execute(stmt).all()), limit, lambda r: r[0].id)
        return Page[ProductOut](
            items=_outs(session, [(p, path) for p, path in rows]), next_cursor=next_cursor
        )


def list_categories(db: Database, limit: int, cursor: str | None) -> Page[CategoryOut]:
    """The tree, parents first (a parent is always created before its children)."""
    with db.reading() as session:
        stmt, limit = paginate(select(Category), Category.id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        if not rows:
            return Page[CategoryOut](items=[], next_cursor=None)
        direct: dict[int, int] = {
            cid: count
            for cid, count in session.execute(
                select(Product.category_id, func.count())
                .where(Product.category_id.is_not(None))
                .group_by(Product.category_id)
            )
            if cid is not None
        }
        tree = {
            cid: (path, parent)
            for cid, path, parent in session.execute(select(Category.id, Category.path, Category.parent_id))
        }
        paths = {cid: path for cid, (path, _) in tree.items()}
        totals: dict[int, int] = {}
        for cid, count in direct.items():
            node: int | None = cid
            while node is not None:  # the category and each of its ancestors
                totals[node] = totals.get(node, 0) + count
                node = tree[node][1]
        items = [
            CategoryOut(
                id=c.id,
                path=c.path,
                name=c.name,
                parent=paths.get(c.parent_id) if c.parent_id else None,
                depth=c.depth,
                product_count=direct.get(c.id, 0),
                total_product_count=totals.get(c.id, 0),
            )
            for c in rows
        ]
        return Page[CategoryOut](items=items, next_cursor=next_cursor)


# Product groups


def _group_by_code(session: Session, code: str) -> ProductGroup:
    group = session.scalar(select(ProductGroup).where(ProductGroup.code == code))
    if group is None:
        raise not_found("product_group", code)
    return group


def _explicit_skus(session: Session, group_ids: Sequence[int]) -> dict[int, list[str]]:
    skus: dict[int, list[str]] = {gid: [] for gid in group_ids}
    for part in _chunks(group_ids):
        for gid, sku in session.execute(
            select(ProductGroupItem.group_id, Product.sku)
            .join(Product, Product.id == ProductGroupItem.product_id)
            .where(ProductGroupItem.group_id.in_(part))
            .order_by(Product.sku)
        ):
            skus[gid].append(sku)
    return skus


def _group_out(group: ProductGroup, skus: list[str] | None) -> GroupOut:
    return GroupOut(
        id=group.id,
        code=group.code,
        name=group.name,
        kind=group.kind,
        skus=skus if group.kind == "explicit" else None,
        rule=GroupRule.model_validate(group.rule)
        if group.kind == "rule" and group.rule is not None
        else None,
        created_at=group.created_at,
        updated_at=group.updated_at,
    )


def _product_ids(session: Session, skus: Sequence[str], field: str = "skus.{}") -> dict[str, int]:
    """Ids of the given skus; any unknown one is refused (naming every unknown sku)."""
    ids: dict[str, int] = {}
    for part in _chunks(list(dict.fromkeys(skus))):
        ids.update(session.execute(select(Product.sku, Product.id).where(Product.sku.in_(part))).all())
    unknown = [s for s in dict.fromkeys(skus) if s not in ids]
    if unknown:
        index = list(skus).index(unknown[0])
        raise NotFound(
            "unknown_product",
            f"No product {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
            field=field.format(index),
            details={"skus": unknown},
        )
    return ids


def _set_items(session: Session, group: ProductGroup, skus: Sequence[str] | None) -> None:
    session.execute(delete(ProductGroupItem).where(ProductGroupItem.group_id == group.id))
    if skus:
        ids = _product_ids(session, skus)
        session.execute(
            insert(ProductGroupItem),
            [{"group_id": group.id, "product_id": pid} for pid in sorted(set(ids.values()))],
        )


def create_group(db: Database, data: GroupCreate, actor: Principal) -> GroupOut:
    with _writing(db) as session:
        if session.scalar(select(ProductGroup.id).where(ProductGroup.code == data.code)) is not None:
            raise Conflict("duplicate_code", f"Product group {data.code!r} already exists", field="code")
        now = utcnow()
        group = ProductGroup(
            code=data.code,
            name=data.name,
            kind="explicit" if data.skus is not None else "rule",
            rule=data.rule.model_dump(mode="json") if data.rule is not None else None,
            created_at=now,
            updated_at=now,
        )
        session.add(group)
        session.flush()
        if data.skus is not None:
            _set_items(session, group, data.skus)
        out = _group_out(group, _explicit_skus(session, [group.id])[group.id])
        record_audit(session, actor, "create", "product_group", group.code, None, _snapshot(out))
        return out


def get_group(db: Database, code: str) -> GroupOut:
    with db.reading() as session:
        group = _group_by_code(session, code)
        return _group_out(group, _explicit_skus(session, [group.id])[group.id])


def list_groups(db: Database, limit: int, cursor: str | None) -> Page[GroupOut]:
    with db.reading() as session:
        stmt, limit = paginate(select(ProductGroup), ProductGroup.id, limit, cursor)
        rows, next_cursor = cut(list(session.scalars(stmt).all()), limit)
        skus = _explicit_skus(session, [g.id for g in rows if g.kind == "explicit"])
        return Page[GroupOut](items=[_group_out(g, skus.get(g.id)) for g in rows], next_cursor=next_cursor)


def update_group(db: Database, code: str, data: GroupUpdate, actor: Principal) -> GroupOut:
    given = data.model_fields_set
    with _writing(db) as session:
        group = _group_by_code(session, code)
        before = _snapshot(_group_out(group, _explicit_skus(session, [group.id])[group.id]))
        if "name" in given and data.name is not None:
            group.name = data.name
        if data.skus is not None:
            group.kind, group.rule = "explicit", None
            _set_items(session, group, data.skus)
        elif data.rule is not None:
            group.kind, group.rule = "rule", data.rule.model_dump(mode="json")
            _set_items(session, group, None)
        after = _snapshot(_group_out(group, _explicit_skus(session, [group.id])[group.id]))
        if after != before:
            group.updated_at = utcnow()
        session.flush()
        _audit_update(session, actor, "product_group", group.code, before, after)
        return _group_out(group, _explicit_skus(session, [group.id])[group.id])


def _rule_candidates(rule: dict[str, Any]) -> Any:
    """Products a rule may match, narrowed in SQL; ``rule_matches`` has the last word."""
    stmt = _products()
    if rule.get("categories"):
        stmt = stmt.where(or_(*[_under(Category.path, c) for c in rule["categories"]]))
    if rule.get("brands"):
        stmt = stmt.where(Product.brand.in_(rule["brands"]))
    if rule.get("exclude_skus"):
        stmt = stmt.where(Product.sku.not_in(rule["exclude_skus"]))
    return stmt


def _in_rule(rule: dict[str, Any]) -> Callable[[Any], bool]:
    return lambda row: rule_matches(rule, row[0].sku, row[1], row[0].brand, row[0].attributes or {})


def group_products(db: Database, code: str, limit: int, cursor: str | None) -> Page[ProductOut]:
    with db.reading() as session:
        group = _group_by_code(session, code)
        if group.kind == "explicit":
            stmt = (
                _products()
                .join(ProductGroupItem, ProductGroupItem.product_id == Product.id)
                .where(ProductGroupItem.group_id == group.id)
            )
            stmt, limit = paginate(stmt, Product.id, limit, cursor)
            rows, next_cursor = cut(list(session.execute(stmt).all()), limit, lambda r: r[0].id)
        else:
            rule = group.rule or {}
            rows, next_cursor = _scan(
                session, _rule_candidates(rule), Product.id, limit, cursor, _in_rule(rule), lambda r: r[0].id
            )
        return Page[ProductOut](
            items=_outs(session, [(p, path) for p, path in rows]), next_cursor=next_cursor
        )


# Stock


def put_stock(db: Database, code: str, data: StockPut, actor: Principal) -> StockPutResult:
    """Sets the quantities of the given products in one store (others are left as they are)."""
    skus = [item.sku for item in data.items]
    seen: set[str] = set()
    for index, sku in enumerate(skus):
        if sku in seen:
            raise AppError(
                "duplicate_in_batch", f"Product {sku!r} is listed twice", field=f"items.{index}.sku"
            )
        seen.add(sku)
    with _writing(db) as session:
        store = store_by_code(session, code)
        ids = _product_ids(session, skus, "items.{}.sku")
        before: dict[str, str | None] = dict.fromkeys(skus)
        by_id = {pid: sku for sku, pid in ids.items()}
        for part in _chunks(list(by_id)):
            for pid, quantity in session.execute(
                select(Stock.product_id, Stock.quantity).where(
                    Stock.store_id == store.id, Stock.product_id.in_(part)
                )
            ):
                before[by_id[pid]] = format(quantity, "f")
        if data.items:
            now = utcnow()
            dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
            stmt = dialect_insert(Stock)
            stmt = stmt.on_conflict_do_update(
                index_elements=["store_id", "product_id"],
                set_={"quantity": stmt.excluded.quantity, "updated_at": stmt.excluded.updated_at},
            )
            rows = [
                {"store_id": store.id, "product_id": ids[i.sku], "quantity": i.quantity, "updated_at": now}
                for i in data.items
            ]
            for batch in _chunks(rows, 1000):
                session.execute(stmt, list(batch))
        after = {i.sku: format(i.quantity, "f") for i in data.items}
        changed = []
        for sku in skus:
            old = before[sku]
            if old is None or Decimal(old) != Decimal(after[sku]):
                changed.append(sku)
        if changed:
            record_audit(
                session,
                actor,
                "set_stock",
                "store",
                store.code,
                {"stock": {s: before[s] for s in changed}},
                {"stock": {s: after[s] for s in changed}},
            )
        return StockPutResult(store=store.code, updated=len(data.items))


def list_stock(db: Database, code: str, limit: int, cursor: str | None) -> Page[StockOut]:
    with db.reading() as session:
        store = store_by_code(session, code)
        stmt = (
            select(Stock, Product.sku, Product.name)
            .join(Product, Product.id == Stock.product_id)
            .where(Stock.store_id == store.id)
        )
        stmt, limit = paginate(stmt, Stock.id, limit, cursor)
        rows, next_cursor = cut(list(session.execute(stmt).all()), limit, lambda r: r[0].id)
        return Page[StockOut](
            items=[
                StockOut(sku=sku, name=name, quantity=s.quantity, updated_at=s.updated_at)
                for s, sku, name in rows
            ],
            next_cursor=next_cursor,
        )


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def availability(db: Database, sku: str, lat: float | None, lon: float | None, limit: int) -> Availability:
    """Open stores having the product, nearest first when a point is given (stores without
    coordinates last), else by store code."""
    limit = check_limit(limit)
    if lat is not None and not -90 <= lat <= 90:
        raise AppError("invalid_latitude", "lat is between -90 and 90", field="lat")
    if lon is not None and not -180 <= lon <= 180:
        raise AppError("invalid_longitude", "lon is between -180 and 180", field="lon")
    if (lat is None) != (lon is None):
        raise AppError(
            "incomplete_coordinates",
            "Give both lat and lon, or neither",
            field="lon" if lon is None else "lat",
        )
    with db.reading() as session:
        product_id = session.scalar(select(Product.id).where(Product.sku == sku))
        if product_id is None:
            raise not_found("product", sku)
        rows = session.execute(
            select(Store, Stock.quantity)
            .join(Stock, Stock.store_id == Store.id)
            .where(Stock.product_id == product_id, Stock.quantity > 0, Store.active.is_(True))
        ).all()
        items = []
        for store, quantity in rows:
            distance = None
            if (
                lat is not None
                and lon is not None
                and store.latitude is not None
                and store.longitude is not None
            ):
                distance = round(distance_km(lat, lon, store.latitude, store.longitude), 3)
            items.append(
                AvailabilityOut(
                    store=store.code,
                    name=store.name,
                    channel=store.channel,
                    city=store.city,
                    address=store.address,
                    latitude=store.latitude,
                    longitude=store.longitude,
                    quantity=quantity,
                    distance_km=distance,
                )
            )
        items.sort(key=lambda a: (a.distance_km is None, a.distance_km or 0.0, a.store))
        return Availability(items=items[:limit])


# Helpers for other packages (they run inside the caller's transaction)


def default_legal_entity_id(session: Session) -> int | None:
    return session.scalar(select(LegalEntity.id).where(LegalEntity.is_default.is_(True)))


def legal_entity_id_by_code(session: Session, code: str) -> int:
    """Raises ``unknown_legal_entity`` (404)."""
    entity_id = session.scalar(select(LegalEntity.id).where(LegalEntity.code == code))
    if entity_id is None:
        raise not_found("legal_entity", code, field="legal_entity")
    return entity_id


def store_by_code(session: Session, code: str) -> Store:
    """Raises ``unknown_store`` (404)."""
    store = session.scalar(select(Store).where(Store.code == code))
    if store is None:
        raise not_found("store", code, field="store")
    return store


@dataclass(frozen=True, slots=True)
class ProductFacts:
    """What the offers engine needs to know about a cheque line's product."""

    sku: str
    name: str
    price: Decimal | None
    category_path: str | None
    brand: str | None
    attributes: dict[str, Any]
    groups: frozenset[str]
    active: bool


@dataclass(frozen=True, slots=True)
class StoreFacts:
    """A store as processing reads it on every cheque (kept in the reference-data cache)."""

    id: int
    code: str
    legal_entity_id: int
    channel: str
    timezone: str
    attributes: dict[str, Any]


def _store_facts(store: Store) -> StoreFacts:
    return StoreFacts(
        store.id,
        store.code,
        store.legal_entity_id,
        store.channel,
        store.timezone,
        dict(store.attributes or {}),
    )


def store_facts(session: Session, store_id: int) -> StoreFacts | None:
    """The store by id from the reference-data cache (None if it does not exist)."""

    def load() -> StoreFacts | None:
        store = session.get(Store, store_id)
        return _store_facts(store) if store is not None else None

    return refcache.cached(session, ("store", store_id), load)


def store_facts_by_code(session: Session, code: str) -> StoreFacts:
    """The store by code from the reference-data cache; raises ``unknown_store`` (404)."""

    def load() -> StoreFacts | None:
        store = session.scalar(select(Store).where(Store.code == code))
        return _store_facts(store) if store is not None else None

    facts = refcache.cached(session, ("store_code", code), load)
    if facts is None:
        raise not_found("store", code, field="store")
    return facts


def legal_entity_id(session: Session, code: str) -> int | None:
    """A legal entity's id by code, from the reference-data cache."""
    return refcache.cached(
        session,
        ("legal_entity", code),
        lambda: session.scalar(select(LegalEntity.id).where(LegalEntity.code == code)),
    )


def product_facts_cached(session: Session, skus: Iterable[str]) -> dict[str, ProductFacts]:
    """``product_facts`` through the reference-data cache: a till's cheque usually reads nothing."""
    wanted = list(dict.fromkeys(skus))
    found: dict[str, ProductFacts] = {}
    missing: list[str] = []
    for sku in wanted:
        hit = refcache.peek(session, ("product", sku))
        if hit is refcache.MISSING:
            missing.append(sku)
        elif hit is not None:
            found[sku] = hit
    if missing:
        loaded = refcache.fill(
            session, [("product", sku) for sku in missing], lambda: _facts_by_key(session, missing)
        )
        found.update({key[1]: facts for key, facts in loaded.items() if facts is not None})
    return found


def _facts_by_key(session: Session, skus: list[str]) -> dict[Any, ProductFacts | None]:
    facts = product_facts(session, skus)
    return {("product", sku): facts.get(sku) for sku in skus}


def skus_by_barcode(session: Session, barcodes: Iterable[str]) -> dict[str, str]:
    """Barcode → sku for the barcodes known (unknown ones are left out)."""
    found: dict[str, str] = {}
    for part in _chunks(list(dict.fromkeys(barcodes))):
        found.update(
            session.execute(
                select(ProductBarcode.barcode, Product.sku)
                .join(Product, Product.id == ProductBarcode.product_id)
                .where(ProductBarcode.barcode.in_(part))
            ).all()
        )
    return found


def product_facts(session: Session, skus: Iterable[str]) -> dict[str, ProductFacts]:
    """Facts of the known skus (unknown ones are left out), with every group each belongs to,
    explicit or by rule: three queries whatever the number of lines."""
    rows: list[tuple[Product, str | None]] = []
    for part in _chunks(list(dict.fromkeys(skus))):
        rows.extend(session.execute(_products().where(Product.sku.in_(part))).all())
    explicit: dict[int, set[str]] = {}
    for ids in _chunks([p.id for p, _ in rows]):
        for product_id, code in session.execute(
            select(ProductGroupItem.product_id, ProductGroup.code)
            .join(ProductGroup, ProductGroup.id == ProductGroupItem.group_id)
            .where(ProductGroupItem.product_id.in_(ids))
        ):
            explicit.setdefault(product_id, set()).add(code)
    rules = session.execute(
        select(ProductGroup.code, ProductGroup.rule).where(ProductGroup.kind == "rule")
    ).all()
    facts = {}
    for product, path in rows:
        attributes = dict(product.attributes or {})
        groups = set(explicit.get(product.id, ()))
        groups.update(
            code
            for code, rule in rules
            if rule_matches(rule or {}, product.sku, path, product.brand, attributes)
        )
        facts[product.sku] = ProductFacts(
            sku=product.sku,
            name=product.name,
            price=product.price,
            category_path=path,
            brand=product.brand,
            attributes=attributes,
            groups=frozenset(groups),
            active=product.active,
        )
    return facts


def group_skus(session: Session, code: str) -> set[str]:
    """Every sku of the group, explicit or resolved from its rule; raises ``unknown_product_group``."""
    group = _group_by_code(session, code)
    if group.kind == "explicit":
        return set(
            session.scalars(
                select(Product.sku)
                .join(ProductGroupItem, ProductGroupItem.product_id == Product.id)
                .where(ProductGroupItem.group_id == group.id)
            ).all()
        )
    rule = group.rule or {}
    keep = _in_rule(rule)
    return {row[0].sku for row in session.execute(_rule_candidates(rule)) if keep(row)}
