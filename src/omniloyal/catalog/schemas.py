"""API models of the catalogue: legal entities, stores, payment methods, products, groups, stock.

Everything that needs no database is checked here, so a bad field is a 422 with a specific code
(``invalid_code``, ``invalid_timezone``, ``invalid_channel``, ``invalid_price``...) before any work.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from omniloyal.catalog.groups import CATEGORY_SEPARATOR
from omniloyal.catalog.models import STORE_CHANNELS
from omniloyal.kernel.money import DecimalStr

Channel = Literal["offline", "online_store", "mobile_app"]
GroupKind = Literal["explicit", "rule"]

MAX_BATCH = 1000
MAX_STOCK_ITEMS = 10_000
MAX_BARCODES = 100
MAX_CATEGORY_DEPTH = 10
# Amount(2) on SQLite is a scaled 64-bit integer: keep far below its limit.
MAX_AMOUNT = Decimal("1000000000000")

_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$")
# SKUs travel in URL paths: no spaces, slashes or URL specials.
_SKU = re.compile(r"^[^\s/?#%\\]{1,100}$")
_BARCODE = re.compile(r"^\S{1,64}$")


def _code(value: object) -> str:
    if isinstance(value, str) and _CODE.match(value.strip()):
        return value.strip()
    raise PydanticCustomError(
        "invalid_code",
        "A code is 1 to 64 Latin letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
    )


def sku_value(value: object) -> str:
    if isinstance(value, str) and _SKU.match(value.strip()):
        return value.strip()
    raise PydanticCustomError(
        "invalid_sku", "A sku is 1 to 100 characters without spaces, '/', '?', '#', '%' or '\\'"
    )


def _barcode(value: object) -> str:
    if isinstance(value, str) and _BARCODE.match(value.strip()):
        return value.strip()
    raise PydanticCustomError("invalid_barcode", "A barcode is 1 to 64 characters without spaces")


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _timezone(value: object) -> str:
    if isinstance(value, str) and value:
        zones = _zones()
        if value in zones:
            return value
        if not zones:  # no zone list on this system: ask zoneinfo directly
            try:
                ZoneInfo(value)
                return value
            except (ZoneInfoNotFoundError, ValueError):
                pass
    raise PydanticCustomError("invalid_timezone", "Not an IANA time zone such as Europe/Moscow")


def _channel(value: object) -> object:
    if value not in STORE_CHANNELS:
        raise PydanticCustomError("invalid_channel", f"channel is one of {', '.join(STORE_CHANNELS)}")
    return value


def _coordinate(limit: int, code: str) -> Any:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise PydanticCustomError(code, f"A number between -{limit} and {limit}")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or not -limit <= number <= limit:
            raise PydanticCustomError(code, f"A number between -{limit} and {limit}")
        return number

    return check


def _scalar(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool)


def _attributes(value: object) -> dict[str, Any]:
    """Attribute values are strings, numbers, booleans or lists of those; names are not blank."""
    if not isinstance(value, dict):
        raise PydanticCustomError("invalid_attributes", "attributes is an object of name: value")
    for name, item in value.items():
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise PydanticCustomError(
                "invalid_attribute", "Attribute names are 1 to 100 characters, not blank"
            )
        ok = all(_scalar(v) for v in item) if isinstance(item, list) else _scalar(item)
        if not ok:
            raise PydanticCustomError(
                "invalid_attribute",
                "Attribute {name}: a value is a string, number or boolean, or a list of those",
                {"name": name},
            )
    return value


def category_path(value: object) -> str:
    """``"Food / Dairy"`` or ``["Food", "Dairy"]`` → ``"Food / Dairy"``; names may not contain '/'."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split("/")]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
        if any("/" in n for n in names):
            raise PydanticCustomError("invalid_category", "Category names in a list may not contain '/'")
    else:
        raise PydanticCustomError(
            "invalid_category", 'A category is a path "Food / Dairy" or a list of names'
        )
    if not names or any(not n or len(n) > 300 for n in names):
        raise PydanticCustomError("invalid_category", "Category names are 1 to 300 characters, not blank")
    if len(names) > MAX_CATEGORY_DEPTH:
        raise PydanticCustomError(
            "invalid_category", f"A category path has at most {MAX_CATEGORY_DEPTH} levels"
        )
    path = CATEGORY_SEPARATOR.join(names)
    if len(path) > 1000:
        raise PydanticCustomError("invalid_category", "A category path is at most 1000 characters")
    return path


def _decimal_in(code: str, what: str) -> Any:
    """Runs before ``DecimalStr`` so that a float or garbage gets this field's own code."""

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
            raise PydanticCustomError(code, f'{what} is a decimal string such as "10.50" (not a float)')
        if isinstance(value, str):
            try:
                value = Decimal(value.strip())
            except InvalidOperation:
                raise PydanticCustomError(code, f"{what} is not a decimal number") from None
        if isinstance(value, Decimal) and not value.is_finite():
            raise PydanticCustomError(code, f"{what} must be a finite number")
        return value

    return check


def _amount(code: str, places: int, what: str) -> Any:
    quantum = Decimal(1).scaleb(-places)

    def check(value: Decimal) -> Decimal:
        exponent = value.as_tuple().exponent
        if value < 0 or value > MAX_AMOUNT or (isinstance(exponent, int) and exponent < -places):
            raise PydanticCustomError(code, f"{what} is a non-negative decimal with at most {places} places")
        return value.quantize(quantum)  # as stored, so every answer shows the same digits

    return check


def _unique_barcodes(values: list[str]) -> list[str]:
    if len(values) > MAX_BARCODES:
        raise PydanticCustomError("invalid_barcode", f"At most {MAX_BARCODES} barcodes per product")
    return list(dict.fromkeys(values))


def _not_null(value: object) -> object:
    if value is None:
        raise PydanticCustomError("null_not_allowed", "This field cannot be null; leave it out to keep it")
    return value


Code = Annotated[str, BeforeValidator(_code)]
Sku = Annotated[str, BeforeValidator(sku_value)]
Barcode = Annotated[str, BeforeValidator(_barcode)]
Barcodes = Annotated[list[Barcode], AfterValidator(_unique_barcodes)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Unit = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20)]
TaxId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Timezone = Annotated[str, BeforeValidator(_timezone)]
ChannelIn = Annotated[Channel, BeforeValidator(_channel)]
Latitude = Annotated[float, BeforeValidator(_coordinate(90, "invalid_latitude"))]
Longitude = Annotated[float, BeforeValidator(_coordinate(180, "invalid_longitude"))]
Attributes = Annotated[dict[str, Any], BeforeValidator(_attributes)]
CategoryPath = Annotated[str, BeforeValidator(category_path)]
Price = Annotated[
    DecimalStr,
    AfterValidator(_amount("invalid_price", 2, "A price")),
    BeforeValidator(_decimal_in("invalid_price", "A price")),
]
Quantity = Annotated[
    DecimalStr,
    AfterValidator(_amount("invalid_quantity", 3, "A quantity")),
    BeforeValidator(_decimal_in("invalid_quantity", "A quantity")),
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Legal entities


class LegalEntityCreate(_In):
    code: Code
    name: Name
    tax_id: TaxId | None = None
    is_default: StrictBool = Field(
        default=False, description="Make this the default legal entity (the first one always is)"
    )


class LegalEntityUpdate(_In):
    name: Name | None = None
    tax_id: TaxId | None = None
    is_default: StrictBool | None = Field(
        default=None, description="true moves the default here; the default cannot be unset, only moved"
    )

    _required = field_validator("name", "is_default")(_not_null)


class LegalEntityOut(BaseModel):
    id: int
    code: str
    name: str
    tax_id: str | None
    is_default: bool
    created_at: datetime


# Stores (points of sale)


class StoreCreate(_In):
    code: Code
    name: Name
    legal_entity: Code | None = Field(
        default=None, description="Legal entity code; the default one if left out"
    )
    channel: ChannelIn = "offline"
    timezone: Timezone | None = Field(
        default=None, description="IANA zone; the retailer's default if left out"
    )
    address: Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)] | None = None
    city: ShortText | None = None
    region: ShortText | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None
    attributes: Attributes = Field(default_factory=dict, examples=[{"CustomTradeFormat": "Hypermarket"}])


class StoreUpdate(_In):
    """Only the fields given change; ``attributes`` given replaces the whole dict."""

    name: Name | None = None
    legal_entity: Code | None = None
    channel: ChannelIn | None = None
    timezone: Timezone | None = None
    address: Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)] | None = None
    city: ShortText | None = None
    region: ShortText | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None
    attributes: Attributes | None = None
    active: StrictBool | None = Field(default=None, description="false closes the store")

    _required = field_validator("name", "legal_entity", "channel", "timezone", "attributes", "active")(
        _not_null
    )


class StoreOut(BaseModel):
    id: int
    code: str
    name: str
    legal_entity: str
    channel: Channel
    timezone: str
    address: str | None
    city: str | None
    region: str | None
    latitude: float | None
    longitude: float | None
    attributes: dict[str, Any]
    active: bool
    created_at: datetime
    updated_at: datetime


# Payment methods


class PaymentMethodCreate(_In):
    code: Code
    name: ShortText


class PaymentMethodOut(BaseModel):
    id: int
    code: str
    name: str
    created_at: datetime


# Products and categories


class ProductFields(_In):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
    price: Price | None = Field(default=None, examples=["89.90"])
    category: CategoryPath | None = Field(
        default=None, description='"Food / Dairy / Milk" or ["Food", "Dairy", "Milk"]; created on the fly'
    )
    brand: ShortText | None = None
    barcodes: Barcodes = Field(default_factory=list)
    unit: Unit = "pcs"
    attributes: Attributes = Field(default_factory=dict)
    active: StrictBool = True


class ProductIn(ProductFields):
    sku: Sku


class ProductPut(ProductFields):
    """The whole product: fields left out get their defaults (no barcodes, no category...)."""

    sku: Sku | None = Field(default=None, description="If given, must equal the sku in the path")


class ProductUpdate(_In):
    """Only the fields given change; ``barcodes`` and ``attributes`` given replace the old ones."""

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)] | None = None
    price: Price | None = None
    category: CategoryPath | None = None
    brand: ShortText | None = None
    barcodes: Barcodes | None = None
    unit: Unit | None = None
    attributes: Attributes | None = None
    active: StrictBool | None = None

    _required = field_validator("name", "barcodes", "unit", "attributes", "active")(_not_null)


class ProductOut(BaseModel):
    id: int
    sku: str
    name: str
    price: DecimalStr | None
    category: str | None
    brand: str | None
    barcodes: list[str]
    unit: str
    attributes: dict[str, Any]
    active: bool
    created_at: datetime
    updated_at: datetime


class ProductBatch(_In):
    items: list[Any] = Field(description=f"Up to {MAX_BATCH} products, each as for POST /products")

    @field_validator("items")
    @classmethod
    def _size(cls, items: list[Any]) -> list[Any]:
        if len(items) > MAX_BATCH:
            raise PydanticCustomError("too_many_items", f"At most {MAX_BATCH} products per batch")
        return items


class BatchError(BaseModel):
    index: int
    code: str
    message: str
    field: str | None


class BatchResult(BaseModel):
    accepted: int = Field(description="Items created, updated or already up to date")
    created: int
    updated: int
    unchanged: int
    errors: list[BatchError]


class CategoryOut(BaseModel):
    id: int
    path: str
    name: str
    parent: str | None
    depth: int
    product_count: int = Field(description="Products directly in this category")
    total_product_count: int = Field(description="Products in this category and its sub-categories")


# Product groups


def _rule_attributes(value: object) -> object:
    if not isinstance(value, dict):
        raise PydanticCustomError("invalid_attributes", "attributes is an object of name: [values]")
    normalised = {k: v if isinstance(v, list) else [v] for k, v in value.items()}
    _attributes(normalised)
    if any(not v for v in normalised.values()):
        raise PydanticCustomError("invalid_attribute", "Give at least one wanted value per attribute")
    return normalised


class GroupRule(_In):
    """Every part given must match; a category matches its sub-categories."""

    categories: list[CategoryPath] = Field(default_factory=list, examples=[["Food / Dairy"]])
    brands: list[ShortText] = Field(default_factory=list)
    attributes: Annotated[dict[str, list[Any]], BeforeValidator(_rule_attributes)] = Field(
        default_factory=dict, examples=[{"fat": ["3.2", "2.5"]}]
    )
    exclude_skus: list[Sku] = Field(default_factory=list)


class GroupCreate(_In):
    code: Code
    name: Name
    skus: list[Sku] | None = Field(default=None, description="An explicit list of products")
    rule: GroupRule | None = Field(default=None, description="Or a rule on category, brand and attributes")

    @model_validator(mode="after")
    def _one_kind(self) -> GroupCreate:
        if (self.skus is None) == (self.rule is None):
            raise PydanticCustomError("skus_or_rule", "Give either skus (an explicit list) or a rule")
        return self


class GroupUpdate(_In):
    """``skus`` makes the group explicit with exactly these products; ``rule`` makes it a rule group."""

    name: Name | None = None
    skus: list[Sku] | None = None
    rule: GroupRule | None = None

    _required = field_validator("name", "skus", "rule")(_not_null)

    @model_validator(mode="after")
    def _one_kind(self) -> GroupUpdate:
        if self.skus is not None and self.rule is not None:
            raise PydanticCustomError("skus_or_rule", "Give either skus or a rule, not both")
        return self


class GroupOut(BaseModel):
    id: int
    code: str
    name: str
    kind: GroupKind
    skus: list[str] | None = Field(description="For explicit groups")
    rule: GroupRule | None = Field(description="For rule groups")
    created_at: datetime
    updated_at: datetime


# Stock


class StockItemIn(_In):
    sku: Sku
    quantity: Quantity


class StockPut(_In):
    items: list[StockItemIn]

    @field_validator("items")
    @classmethod
    def _size(cls, items: list[StockItemIn]) -> list[StockItemIn]:
        if len(items) > MAX_STOCK_ITEMS:
            raise PydanticCustomError("too_many_items", f"At most {MAX_STOCK_ITEMS} items per request")
        return items


class StockPutResult(BaseModel):
    store: str
    updated: int


class StockOut(BaseModel):
    sku: str
    name: str
    quantity: DecimalStr
    updated_at: datetime


class AvailabilityOut(BaseModel):
    store: str
    name: str
    channel: Channel
    city: str | None
    address: str | None
    latitude: float | None
    longitude: float | None
    quantity: DecimalStr
    distance_km: float | None = Field(
        description="From the given point; null without lat/lon or store coordinates"
    )


class Availability(BaseModel):
    items: list[AvailabilityOut]
