"""API models for offers and target audiences.

An offer's chains are validated here, strictly: every filter and action is a Pydantic model of a
discriminated union on ``type`` that declares exactly the parameters the engine reads
(``offers/engine.py``), so a stored offer can never make the engine guess or fail. Checks that
need the database (known store codes, skus, audiences, currencies...) are in the service; each
model lists what it refers to (:meth:`_Rule.references`).

Error paths are JSON paths of the bad node (``chains.0.actions.1.type``): Pydantic puts the
union's tag into the location (``chains.0.filters.1.stores.codes``), :class:`_OfferBody` takes
it out again.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainValidator,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from omniloyal.kernel.money import DecimalStr
from omniloyal.members.schemas import CardNumber
from omniloyal.offers.engine import CHEQUE_FILTERS, EVENT_ACTIONS, EVENTS, MEMBER_EVENTS, PURCHASE_EVENTS

OfferStatus = Literal["draft", "active", "paused", "finished", "archived"]
AudienceMode = Literal["add", "remove", "replace"]

MAX_AUDIENCE_IDS_PER_CALL = 100_000
HUNDRED = Decimal(100)

Loc = tuple[str | int, ...]


def refusal(code: str, message: str, loc: Loc, value: Any) -> ValidationError:
    """A validation error at ``loc`` (relative to the model raising it) with our own code."""
    details: list[InitErrorDetails] = [
        {"type": PydanticCustomError(code, message), "loc": loc, "input": value}
    ]
    return ValidationError.from_exception_data("offer", details)


# ---------------------------------------------------------------- value types


def _places(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _money(value: Decimal) -> Decimal:
    if value < 0:
        raise PydanticCustomError("invalid_amount", "An amount cannot be negative")
    if _places(value) > 2:
        raise PydanticCustomError("invalid_amount", "An amount has at most 2 decimal places")
    return value


def _positive_money(value: Decimal) -> Decimal:
    if _money(value) == 0:
        raise PydanticCustomError("invalid_amount", "The amount must be greater than 0")
    return value


def _percent(value: Decimal) -> Decimal:
    if value < 0 or value > HUNDRED:
        raise PydanticCustomError("invalid_percent", "A percentage is between 0 and 100")
    if _places(value) > 4:
        raise PydanticCustomError("invalid_percent", "A percentage has at most 4 decimal places")
    return value


def _quantity(value: Decimal) -> Decimal:
    if value <= 0 or _places(value) > 3:
        raise PydanticCustomError("invalid_quantity", "A quantity is greater than 0 with at most 3 decimals")
    return value


def _points(value: Decimal) -> Decimal:
    if value <= 0 or _places(value) > 4:
        raise PydanticCustomError(
            "invalid_value", "The value must be greater than 0 with at most 4 decimal places"
        )
    return value


Money = Annotated[DecimalStr, AfterValidator(_money)]
PositiveMoney = Annotated[DecimalStr, AfterValidator(_positive_money)]
Percent = Annotated[DecimalStr, AfterValidator(_percent)]
Quantity = Annotated[DecimalStr, AfterValidator(_quantity)]
Points = Annotated[DecimalStr, AfterValidator(_points)]

Code = Annotated[str, Field(min_length=1, max_length=64)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
Label = Annotated[str, Field(min_length=1, max_length=300)]


def _scalar(value: object) -> str | int | bool:
    # str, int and bool (a bool is an int); floats are refused like amounts are.
    if isinstance(value, str | int):
        return value
    raise PydanticCustomError(
        "invalid_value", "Expected text, a whole number or true/false; write decimals as strings"
    )


# A value compared with a member's attribute or an event property.
Scalar = Annotated[str | int | bool, PlainValidator(_scalar)]

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_AUDIENCE_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _hhmm(value: str) -> str:
    if not _HHMM.match(value):
        raise PydanticCustomError("invalid_time_of_day", "A time of day is HH:MM, 00:00 to 23:59")
    return value


TimeOfDay = Annotated[str, AfterValidator(_hhmm)]


def _scalar_text(values: list[str | int | bool]) -> list[str | int | bool]:
    # The engine compares list values as text; a JSON true must read "true" like the attribute does.
    return [("true" if v else "false") if isinstance(v, bool) else v for v in values]


ScalarList = Annotated[list[Scalar], Field(min_length=1, max_length=1000), AfterValidator(_scalar_text)]


def _local(value: datetime) -> datetime:
    if value.tzinfo is not None:
        raise PydanticCustomError(
            "invalid_period",
            "The period is the store's wall clock: give a local date-time without offset, "
            "e.g. 2026-12-01T00:00:00",
        )
    return value


LocalDateTime = Annotated[datetime, AfterValidator(_local)]


def _template(text: str) -> str:
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise PydanticCustomError(
            "invalid_template", "Unbalanced braces in the message: write {{ and }} for literal braces"
        ) from exc
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise PydanticCustomError(
                "invalid_template", "Placeholders are bare names in braces, such as {first_name}"
            )
    return text


MessageText = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_template)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# ---------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class Ref:
    """Something a rule names that must exist: ``kind`` is the entity (store, product...)."""

    kind: str
    value: str
    loc: Loc


def _refs(kind: str, values: list[str] | None, name: str) -> Iterator[Ref]:
    for index, value in enumerate(values or ()):
        yield Ref(kind, value, (name, index))


class _Rule(_In):
    def references(self) -> Iterator[Ref]:
        return iter(())


# ---------------------------------------------------------------- filters


class StoresFilter(_Rule):
    """Points of sale by code, or by an attribute value (``CustomTradeFormat`` = Hypermarket)."""

    type: Literal["stores"]
    codes: list[Code] | None = Field(default=None, min_length=1, max_length=10_000)
    attribute: Name | None = None
    values: list[Annotated[str, Field(min_length=1, max_length=300)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )
    exclude: StrictBool = False

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        by_attribute = self.attribute is not None or self.values is not None
        if (self.codes is not None) == by_attribute:
            raise refusal(
                "invalid_filter", "Give either store codes, or an attribute and its values", (), None
            )
        if by_attribute and self.attribute is None:
            raise refusal("missing_field", "The store attribute to compare is missing", ("attribute",), None)
        if by_attribute and self.values is None:
            raise refusal("missing_field", "The attribute values to look for are missing", ("values",), None)
        return self

    def references(self) -> Iterator[Ref]:
        yield from _refs("store", self.codes, "codes")


class ChannelFilter(_Rule):
    type: Literal["channel"]
    channels: list[Literal["offline", "online_store", "mobile_app"]] = Field(min_length=1)


class PaymentMethodFilter(_Rule):
    type: Literal["payment_method"]
    methods: list[Code] = Field(min_length=1, max_length=100)
    min_share_percent: Percent | None = None

    def references(self) -> Iterator[Ref]:
        yield from _refs("payment_method", self.methods, "methods")


class ProductsFilter(_Rule):
    """Cheque lines by sku, group, category (and its sub-categories) or brand, with conditions."""

    type: Literal["products"]
    skus: list[Code] | None = Field(default=None, min_length=1, max_length=10_000)
    groups: list[Code] | None = Field(default=None, min_length=1, max_length=1000)
    categories: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )
    brands: list[Name] | None = Field(default=None, min_length=1, max_length=1000)
    exclude_skus: list[Code] | None = Field(default=None, min_length=1, max_length=10_000)
    exclude_groups: list[Code] | None = Field(default=None, min_length=1, max_length=1000)
    min_quantity: Quantity | None = None
    max_quantity: Quantity | None = None
    min_amount: PositiveMoney | None = None

    @model_validator(mode="after")
    def _meaningful(self) -> Self:
        if not self.model_fields_set - {"type"}:
            raise refusal(
                "invalid_filter",
                "A products filter names skus, groups, categories or brands, or a quantity or amount",
                (),
                None,
            )
        if (
            self.min_quantity is not None
            and self.max_quantity is not None
            and self.min_quantity > self.max_quantity
        ):
            raise refusal(
                "invalid_range", "max_quantity is below min_quantity", ("max_quantity",), self.max_quantity
            )
        return self

    def references(self) -> Iterator[Ref]:
        yield from _refs("product", self.skus, "skus")
        yield from _refs("product_group", self.groups, "groups")
        yield from _refs("category", self.categories, "categories")
        yield from _refs("product", self.exclude_skus, "exclude_skus")
        yield from _refs("product_group", self.exclude_groups, "exclude_groups")


class ChequeAmountFilter(_Rule):
    type: Literal["cheque_amount"]
    min: Money | None = None
    max: Money | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min is None and self.max is None:
            raise refusal("invalid_filter", "Give min, max or both", (), None)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise refusal("invalid_range", "max is below min", ("max",), self.max)
        return self


class DaysOfWeekFilter(_Rule):
    type: Literal["days_of_week"]
    days: list[Annotated[int, Field(ge=1, le=7)]] = Field(min_length=1, max_length=7)

    @field_validator("days")
    @classmethod
    def _sorted(cls, days: list[int]) -> list[int]:
        return sorted(set(days))  # ISO weekdays: 1 = Monday ... 7 = Sunday


class TimeOfDayFilter(_Rule):
    """Local time from (inclusive) to (exclusive); 22:00 → 06:00 spans midnight."""

    type: Literal["time_of_day"]
    from_: TimeOfDay = Field(alias="from")
    to: TimeOfDay

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.from_ == self.to:
            raise refusal(
                "invalid_range", "from and to are the same time: the window is empty", ("to",), self.to
            )
        return self


class DatesFilter(_Rule):
    """Local dates, both ends included."""

    type: Literal["dates"]
    from_: date | None = Field(default=None, alias="from")
    to: date | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.from_ is None and self.to is None:
            raise refusal("invalid_filter", "Give from, to or both", (), None)
        if self.from_ is not None and self.to is not None and self.from_ > self.to:
            raise refusal("invalid_range", "to is before from", ("to",), self.to.isoformat())
        return self


class MembersOnlyFilter(_Rule):
    type: Literal["members_only"]


class CardStateFilter(_Rule):
    type: Literal["card_state"]
    states: list[Literal["prepared", "issued", "activated"]] = Field(min_length=1)


class CardsFilter(_Rule):
    type: Literal["cards"]
    numbers: list[CardNumber] = Field(min_length=1, max_length=10_000)

    def references(self) -> Iterator[Ref]:
        yield from _refs("card", self.numbers, "numbers")


class AudienceFilter(_Rule):
    type: Literal["audience"]
    audiences: list[Code] = Field(min_length=1, max_length=100)
    exclude: StrictBool = False

    def references(self) -> Iterator[Ref]:
        yield from _refs("audience", self.audiences, "audiences")


AttributeOp = Literal["eq", "neq", "gt", "gte", "lt", "lte", "in", "not_in", "exists"]


class MemberAttributeFilter(_Rule):
    """A questionnaire field (gender, city, birth_date...) or a custom attribute compared with a value."""

    type: Literal["member_attribute"]
    attribute: Code
    op: AttributeOp = "eq"
    value: Scalar | None = None
    values: ScalarList | None = None

    @model_validator(mode="after")
    def _operands(self) -> Self:
        if self.op == "exists":
            for name in ("value", "values"):
                if getattr(self, name) is not None:
                    raise refusal("invalid_filter", "exists takes no value", (name,), getattr(self, name))
        elif self.op in {"in", "not_in"}:
            if self.values is None:
                raise refusal(
                    "missing_field", f"{self.op} compares with a list: give values", ("values",), None
                )
            if self.value is not None:
                raise refusal("invalid_filter", f"{self.op} takes values, not value", ("value",), self.value)
        else:
            if self.value is None:
                raise refusal(
                    "missing_field", f"{self.op} compares with one value: give value", ("value",), None
                )
            if self.values is not None:
                raise refusal("invalid_filter", f"{self.op} takes value, not values", ("values",), None)
            if isinstance(self.value, bool) and self.op not in {"eq", "neq"}:
                raise refusal("invalid_filter", f"{self.op} cannot compare yes/no values", ("op",), self.op)
        return self

    def references(self) -> Iterator[Ref]:
        yield Ref("attribute", self.attribute, ("attribute",))


class BirthdayFilter(_Rule):
    type: Literal["birthday"]
    within_days: int | None = Field(default=None, ge=0, le=366)
    this_month: StrictBool = False

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.within_days is None and not self.this_month:
            raise refusal("invalid_filter", "Give within_days or this_month: true", (), None)
        return self


class EventPropertyFilter(_Rule):
    """A property of a member event (e.g. the app platform); member events only."""

    type: Literal["event_property"]
    property: Code
    values: ScalarList


Filter = Annotated[
    StoresFilter
    | ChannelFilter
    | PaymentMethodFilter
    | ProductsFilter
    | ChequeAmountFilter
    | DaysOfWeekFilter
    | TimeOfDayFilter
    | DatesFilter
    | MembersOnlyFilter
    | CardStateFilter
    | CardsFilter
    | AudienceFilter
    | MemberAttributeFilter
    | BirthdayFilter
    | EventPropertyFilter,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------- actions


class DiscountAction(_Rule):
    """percent of the line; amount spread over the lines; price_per_unit = a fixed unit price."""

    type: Literal["discount"]
    kind: Literal["percent", "amount", "price_per_unit"] = "percent"
    value: DecimalStr

    @model_validator(mode="after")
    def _value(self) -> Self:
        if self.value <= 0:
            raise refusal(
                "invalid_value", "The discount value must be greater than 0", ("value",), str(self.value)
            )
        if self.kind == "percent" and (self.value > HUNDRED or _places(self.value) > 4):
            raise refusal("invalid_percent", "A percentage is at most 100", ("value",), str(self.value))
        if self.kind != "percent" and _places(self.value) > 2:
            raise refusal(
                "invalid_amount", "An amount has at most 2 decimal places", ("value",), str(self.value)
            )
        return self


class _Accrual(_Rule):
    currency: Code | None = Field(default=None, description="The default currency when left out")
    activation_delay_days: int = Field(default=0, ge=0, le=3650)
    lifetime_days: int | None = Field(default=None, ge=1, le=36500, description="None: never expire")
    legal_entity: Code | None = Field(default=None, description="Whose emission account pays")

    def references(self) -> Iterator[Ref]:
        if self.currency is not None:
            yield Ref("currency", self.currency, ("currency",))
        if self.legal_entity is not None:
            yield Ref("legal_entity", self.legal_entity, ("legal_entity",))


class BonusAction(_Accrual):
    """Points for the money paid: a percentage of each line, or a fixed amount spread over them."""

    type: Literal["bonus"]
    kind: Literal["percent", "fixed"] = "percent"
    value: Points

    @model_validator(mode="after")
    def _value(self) -> Self:
        if self.kind == "percent" and self.value > HUNDRED:
            raise refusal("invalid_percent", "A percentage is at most 100", ("value",), str(self.value))
        return self


class ExtraBonusAction(_Accrual):
    """A fixed number of points for the whole cheque or event (welcome bonus, app installed...)."""

    type: Literal["extra_bonus"]
    value: Points


class WriteOffRuleAction(_Rule):
    type: Literal["write_off_rule"]
    currency: Code | None = None
    max_percent: Percent = Decimal(100)
    exclude_groups: list[Code] | None = Field(default=None, min_length=1, max_length=1000)

    def references(self) -> Iterator[Ref]:
        if self.currency is not None:
            yield Ref("currency", self.currency, ("currency",))
        yield from _refs("product_group", self.exclude_groups, "exclude_groups")


class SetMinPriceAction(_Rule):
    type: Literal["set_min_price"]
    price: Money | None = None
    percent_of_price: Percent | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.price is None) == (self.percent_of_price is None):
            raise refusal("invalid_action", "Give either price or percent_of_price", (), None)
        return self


class ChequeMessageAction(_Rule):
    type: Literal["cheque_message"]
    text: MessageText


class CashierMessageAction(_Rule):
    type: Literal["cashier_message"]
    text: MessageText


Action = Annotated[
    DiscountAction
    | BonusAction
    | ExtraBonusAction
    | WriteOffRuleAction
    | SetMinPriceAction
    | ChequeMessageAction
    | CashierMessageAction,
    Field(discriminator="type"),
]


def _tags(union: Any) -> frozenset[str]:
    members = get_args(get_args(union)[0])
    return frozenset(get_args(m.model_fields["type"].annotation)[0] for m in members)


FILTER_TYPES = _tags(Filter)
ACTION_TYPES = _tags(Action)


class ChainIn(_In):
    """One event with the filters that must all pass and the actions that then apply."""

    event: str = Field(description=", ".join(EVENTS))
    filters: list[Filter] = Field(default_factory=list, max_length=50)
    actions: list[Action] = Field(max_length=50)

    @field_validator("event")
    @classmethod
    def _known_event(cls, event: str) -> str:
        if event not in EVENTS:
            raise PydanticCustomError("unknown_event", f"Unknown event; known: {', '.join(EVENTS)}")
        return event

    @field_validator("actions")
    @classmethod
    def _some_action(cls, actions: list[Any]) -> list[Any]:
        if not actions:
            raise PydanticCustomError("actions_required", "A chain needs at least one action")
        return actions

    @model_validator(mode="after")
    def _fits_the_event(self) -> Self:
        problems: list[InitErrorDetails] = []
        allowed = EVENT_ACTIONS[self.event]
        for index, action in enumerate(self.actions):
            if action.type not in allowed:
                problems.append(
                    {
                        "type": PydanticCustomError(
                            "action_not_allowed",
                            f"Action {action.type} is not allowed on {self.event}; "
                            f"allowed: {', '.join(sorted(allowed))}",
                        ),
                        "loc": ("actions", index, "type"),
                        "input": action.type,
                    }
                )
        for index, rule in enumerate(self.filters):
            if self.event in MEMBER_EVENTS and rule.type in CHEQUE_FILTERS:
                why = f"Filter {rule.type} needs a cheque; {self.event} has none"
            elif self.event in PURCHASE_EVENTS and rule.type == "event_property":
                why = "event_property filters apply to member events only"
            else:
                continue
            problems.append(
                {
                    "type": PydanticCustomError("filter_not_allowed", why),
                    "loc": ("filters", index, "type"),
                    "input": rule.type,
                }
            )
        if problems:
            raise ValidationError.from_exception_data("chain", problems)
        return self

    def stored(self) -> dict[str, Any]:
        """The JSON kept in ``Offer.chains``: decimals as strings, absent parameters left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


_TAG_PARENTS = {"filters": FILTER_TYPES, "actions": ACTION_TYPES}


def _clean_loc(loc: Loc) -> Loc:
    """Drops the union tag Pydantic inserts after ``filters.N`` / ``actions.N``."""
    out: list[str | int] = []
    for index, part in enumerate(loc):
        if (
            index >= 2
            and isinstance(part, str)
            and isinstance(loc[index - 1], int)
            and part in _TAG_PARENTS.get(str(loc[index - 2]), ())
        ):
            continue
        out.append(part)
    return tuple(out)


def _rewrite(exc: ValidationError) -> ValidationError:
    details: list[InitErrorDetails] = []
    for error in exc.errors():
        loc = _clean_loc(tuple(error["loc"]))
        kind = error["type"]
        message = error["msg"].removeprefix("Value error, ")
        parent = str(loc[-2]) if len(loc) >= 2 else ""
        if kind == "union_tag_invalid" and parent in _TAG_PARENTS:
            noun = "filter" if parent == "filters" else "action"
            kind = f"unknown_{noun}_type"
            message = f"Unknown {noun} type; known: {', '.join(sorted(_TAG_PARENTS[parent]))}"
            loc = (*loc, "type")
        elif kind == "union_tag_not_found":
            kind, message, loc = "missing", "Field required: type", (*loc, "type")
        details.append({"type": PydanticCustomError(kind, message), "loc": loc, "input": error.get("input")})
    return ValidationError.from_exception_data(exc.title, details)


class _OfferBody(_In):
    @model_validator(mode="wrap")
    @classmethod
    def _json_paths(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        try:
            return handler(data)
        except ValidationError as exc:
            raise _rewrite(exc) from None


class OfferCreate(_OfferBody):
    name: Label
    description: Annotated[str, Field(max_length=5000)] | None = None
    priority: int = Field(
        default=0, ge=-1_000_000, le=1_000_000, description="Higher wins among non-summable"
    )
    summable: StrictBool = Field(default=False, description="Applies on top of the chosen non-summable offer")
    starts_at: LocalDateTime | None = Field(default=None, description="Store-local wall clock, no offset")
    ends_at: LocalDateTime | None = Field(default=None, description="Store-local wall clock, exclusive")
    chains: list[ChainIn] = Field(max_length=20)
    max_uses_per_member: int | None = Field(default=None, ge=1, le=1_000_000)
    budget_points: PositiveMoney | None = None
    budget_money: PositiveMoney | None = None

    @field_validator("chains")
    @classmethod
    def _some_chain(cls, chains: list[ChainIn]) -> list[ChainIn]:
        if not chains:
            raise PydanticCustomError("chains_required", "An offer needs at least one chain")
        return chains

    @model_validator(mode="after")
    def _period(self) -> Self:
        if self.starts_at is not None and self.ends_at is not None and self.ends_at <= self.starts_at:
            raise refusal("invalid_period", "ends_at must be after starts_at", ("ends_at",), None)
        return self


_NOT_NULL = ("name", "priority", "summable", "chains")


class OfferUpdate(_OfferBody):
    """Any field; ``chains`` replaces all chains; null clears an optional field."""

    name: Label | None = None
    description: Annotated[str, Field(max_length=5000)] | None = None
    priority: int | None = Field(default=None, ge=-1_000_000, le=1_000_000)
    summable: StrictBool | None = None
    starts_at: LocalDateTime | None = None
    ends_at: LocalDateTime | None = None
    chains: list[ChainIn] | None = Field(default=None, max_length=20)
    max_uses_per_member: int | None = Field(default=None, ge=1, le=1_000_000)
    budget_points: PositiveMoney | None = None
    budget_money: PositiveMoney | None = None

    @field_validator("chains")
    @classmethod
    def _some_chain(cls, chains: list[ChainIn] | None) -> list[ChainIn] | None:
        if chains is not None and not chains:
            raise PydanticCustomError("chains_required", "An offer needs at least one chain")
        return chains

    @model_validator(mode="after")
    def _no_null(self) -> Self:
        for name in _NOT_NULL:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise refusal("null_not_allowed", f"{name} cannot be cleared", (name,), None)
        return self


class OfferOut(BaseModel):
    id: int
    name: str
    description: str | None
    status: OfferStatus
    priority: int
    summable: bool
    starts_at: datetime | None = Field(description="Store-local wall clock (no offset)")
    ends_at: datetime | None = Field(description="Store-local wall clock (no offset)")
    chains: list[dict[str, Any]]
    max_uses_per_member: int | None
    budget_points: DecimalStr | None
    budget_money: DecimalStr | None
    spent_points: DecimalStr
    spent_money: DecimalStr
    uses: int = Field(description="Times the offer applied, over all members")
    created_at: datetime
    updated_at: datetime


class OfferStatusIn(_In):
    status: OfferStatus


class StatusChangeOut(BaseModel):
    id: int
    from_status: OfferStatus | None
    to_status: OfferStatus
    at: datetime
    actor: str


# ---------------------------------------------------------------- target audiences


def _audience_code(value: str) -> str:
    if not _AUDIENCE_CODE.match(value):
        raise PydanticCustomError(
            "invalid_code",
            "A code is 1 to 64 Latin letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


AudienceCode = Annotated[str, AfterValidator(_audience_code)]


class AudienceCreate(_In):
    code: AudienceCode
    name: Label


class AudienceOut(BaseModel):
    code: str
    name: str
    source: str = Field(description="api or segment: who filled the list last")
    member_count: int
    created_at: datetime
    updated_at: datetime


class AudienceMembersIn(_In):
    mode: AudienceMode = Field(description="add, remove, or replace: the audience becomes exactly this set")
    member_ids: list[Annotated[int, Field(ge=1)]] = Field(max_length=MAX_AUDIENCE_IDS_PER_CALL)


class AudienceMembersResult(BaseModel):
    code: str
    added: int
    removed: int
    member_count: int


class AudienceMemberOut(BaseModel):
    member_id: int
    added_at: datetime
