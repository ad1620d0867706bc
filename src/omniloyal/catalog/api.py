"""HTTP endpoints of the catalog package (admin API).

Reads: admin, marketer, operator, analyst. Writes: admin; products, product groups and stock
also marketer.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from omniloyal.auth.deps import get_db, get_settings_dep, require
from omniloyal.auth.schemas import Principal
from omniloyal.catalog import service
from omniloyal.catalog.schemas import (
    Availability,
    BatchResult,
    CategoryOut,
    Channel,
    GroupCreate,
    GroupOut,
    GroupUpdate,
    LegalEntityCreate,
    LegalEntityOut,
    LegalEntityUpdate,
    PaymentMethodCreate,
    PaymentMethodOut,
    ProductBatch,
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
)
from omniloyal.db.engine import Database
from omniloyal.kernel.pagination import DEFAULT_LIMIT, Page
from omniloyal.settings import Settings

router = APIRouter(prefix="/api/v1/admin", tags=["catalog"])

reader = require("marketer", "operator", "analyst")
admin = require()
merchandiser = require("marketer")


# Legal entities


@router.post("/legal-entities", status_code=201, response_model=LegalEntityOut, tags=["legal entities"])
def create_legal_entity(
    data: LegalEntityCreate, db: Database = Depends(get_db), actor: Principal = Depends(admin)
) -> LegalEntityOut:
    """The first legal entity becomes the default; `is_default: true` moves the default here."""
    return service.create_legal_entity(db, data, actor)


@router.get("/legal-entities", response_model=Page[LegalEntityOut], tags=["legal entities"])
def list_legal_entities(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[LegalEntityOut]:
    return service.list_legal_entities(db, limit, cursor)


@router.get("/legal-entities/{code}", response_model=LegalEntityOut, tags=["legal entities"])
def get_legal_entity(
    code: str, db: Database = Depends(get_db), _: Principal = Depends(reader)
) -> LegalEntityOut:
    return service.get_legal_entity(db, code)


@router.patch("/legal-entities/{code}", response_model=LegalEntityOut, tags=["legal entities"])
def update_legal_entity(
    code: str, data: LegalEntityUpdate, db: Database = Depends(get_db), actor: Principal = Depends(admin)
) -> LegalEntityOut:
    return service.update_legal_entity(db, code, data, actor)


# Stores


@router.post("/stores", status_code=201, response_model=StoreOut, tags=["stores"])
def create_store(
    data: StoreCreate,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    actor: Principal = Depends(admin),
) -> StoreOut:
    """A point of sale. Without `legal_entity` the default one; without `timezone` the retailer's."""
    return service.create_store(db, data, actor, settings.default_timezone)


@router.get("/stores", response_model=Page[StoreOut], tags=["stores"])
def list_stores(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    channel: Channel | None = None,
    legal_entity: str | None = Query(default=None, description="Legal entity code"),
    city: str | None = None,
    active: bool | None = None,
    attribute: list[str] = Query(
        default=[], description="Name:Value, e.g. CustomTradeFormat:Hypermarket; repeat to require several"
    ),
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[StoreOut]:
    return service.list_stores(
        db,
        limit,
        cursor,
        channel=channel,
        legal_entity=legal_entity,
        city=city,
        active=active,
        attributes=attribute,
    )


@router.get("/stores/{code}", response_model=StoreOut, tags=["stores"])
def get_store(code: str, db: Database = Depends(get_db), _: Principal = Depends(reader)) -> StoreOut:
    return service.get_store(db, code)


@router.patch("/stores/{code}", response_model=StoreOut, tags=["stores"])
def update_store(
    code: str, data: StoreUpdate, db: Database = Depends(get_db), actor: Principal = Depends(admin)
) -> StoreOut:
    """Only the fields given change; `attributes` replaces the whole dict; `active: false` closes it."""
    return service.update_store(db, code, data, actor)


@router.put("/stores/{code}/stock", response_model=StockPutResult, tags=["stock"])
def put_stock(
    code: str, data: StockPut, db: Database = Depends(get_db), actor: Principal = Depends(merchandiser)
) -> StockPutResult:
    """Sets the quantities of the products listed; the store's other products keep theirs."""
    return service.put_stock(db, code, data, actor)


@router.get("/stores/{code}/stock", response_model=Page[StockOut], tags=["stock"])
def list_stock(
    code: str,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[StockOut]:
    return service.list_stock(db, code, limit, cursor)


# Payment methods


@router.post("/payment-methods", status_code=201, response_model=PaymentMethodOut, tags=["payment methods"])
def create_payment_method(
    data: PaymentMethodCreate, db: Database = Depends(get_db), actor: Principal = Depends(admin)
) -> PaymentMethodOut:
    return service.create_payment_method(db, data, actor)


@router.get("/payment-methods", response_model=Page[PaymentMethodOut], tags=["payment methods"])
def list_payment_methods(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[PaymentMethodOut]:
    return service.list_payment_methods(db, limit, cursor)


@router.get("/payment-methods/{code}", response_model=PaymentMethodOut, tags=["payment methods"])
def get_payment_method(
    code: str, db: Database = Depends(get_db), _: Principal = Depends(reader)
) -> PaymentMethodOut:
    return service.get_payment_method(db, code)


# Products and categories (the fixed paths come before /products/{sku})


@router.post("/products", status_code=201, response_model=ProductOut, tags=["products"])
def create_product(
    data: ProductIn, db: Database = Depends(get_db), actor: Principal = Depends(merchandiser)
) -> ProductOut:
    """Creates a product; an existing sku is refused (`PUT /products/{sku}` replaces)."""
    return service.create_product(db, data, actor)


@router.post("/products/batch", response_model=BatchResult, tags=["products"])
def upsert_products(
    data: ProductBatch, db: Database = Depends(get_db), actor: Principal = Depends(merchandiser)
) -> BatchResult:
    """Creates or replaces up to 1000 products by sku in one transaction. Items are applied in
    order; a refused item is reported with its index and the others are kept."""
    return service.upsert_products(db, data, actor)


@router.get("/products", response_model=Page[ProductOut], tags=["products"])
def list_products(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    category: str | None = Query(default=None, description="A category path; includes its sub-categories"),
    brand: str | None = None,
    q: str | None = Query(default=None, description="Part of the name"),
    active: bool | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[ProductOut]:
    return service.list_products(db, limit, cursor, category=category, brand=brand, q=q, active=active)


@router.get("/products/lookup", response_model=ProductOut, tags=["products"])
def lookup_product(
    barcode: str = Query(min_length=1), db: Database = Depends(get_db), _: Principal = Depends(reader)
) -> ProductOut:
    return service.lookup_barcode(db, barcode)


@router.get("/products/{sku}", response_model=ProductOut, tags=["products"])
def get_product(sku: str, db: Database = Depends(get_db), _: Principal = Depends(reader)) -> ProductOut:
    return service.get_product(db, sku)


@router.put("/products/{sku}", response_model=ProductOut, tags=["products"])
def put_product(
    sku: str,
    data: ProductPut,
    response: Response,
    db: Database = Depends(get_db),
    actor: Principal = Depends(merchandiser),
) -> ProductOut:
    """Creates (201) or replaces (200) the product: fields left out get their defaults."""
    product, created = service.put_product(db, sku, data, actor)
    response.status_code = 201 if created else 200
    return product


@router.patch("/products/{sku}", response_model=ProductOut, tags=["products"])
def update_product(
    sku: str, data: ProductUpdate, db: Database = Depends(get_db), actor: Principal = Depends(merchandiser)
) -> ProductOut:
    """Only the fields given change; `barcodes` and `attributes` given replace the old ones."""
    return service.update_product(db, sku, data, actor)


@router.get("/products/{sku}/availability", response_model=Availability, tags=["stock"])
def availability(
    sku: str,
    lat: float | None = None,
    lon: float | None = None,
    limit: int = DEFAULT_LIMIT,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Availability:
    """Open stores that have the product, nearest first when `lat` and `lon` are given."""
    return service.availability(db, sku, lat, lon, limit)


@router.get("/categories", response_model=Page[CategoryOut], tags=["products"])
def list_categories(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[CategoryOut]:
    """The category tree, parents before their children."""
    return service.list_categories(db, limit, cursor)


# Product groups


@router.post("/product-groups", status_code=201, response_model=GroupOut, tags=["product groups"])
def create_group(
    data: GroupCreate, db: Database = Depends(get_db), actor: Principal = Depends(merchandiser)
) -> GroupOut:
    return service.create_group(db, data, actor)


@router.get("/product-groups", response_model=Page[GroupOut], tags=["product groups"])
def list_groups(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[GroupOut]:
    return service.list_groups(db, limit, cursor)


@router.get("/product-groups/{code}", response_model=GroupOut, tags=["product groups"])
def get_group(code: str, db: Database = Depends(get_db), _: Principal = Depends(reader)) -> GroupOut:
    return service.get_group(db, code)


@router.patch("/product-groups/{code}", response_model=GroupOut, tags=["product groups"])
def update_group(
    code: str, data: GroupUpdate, db: Database = Depends(get_db), actor: Principal = Depends(merchandiser)
) -> GroupOut:
    return service.update_group(db, code, data, actor)


@router.get("/product-groups/{code}/products", response_model=Page[ProductOut], tags=["product groups"])
def group_products(
    code: str,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(reader),
) -> Page[ProductOut]:
    """The group's products: its list, or those its rule matches now."""
    return service.group_products(db, code, limit, cursor)
