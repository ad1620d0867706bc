"""API models for members, cards, consents and custom attribute definitions.

Contacts (phone, e-mail) are normalised in the service, which knows the retailer's phone
region; everything that needs no configuration is checked here, so a bad field is a 422
with a specific code before any work is done.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.money import DecimalStr

Gender = Literal["male", "female"]
CardKind = Literal["physical", "virtual"]
# States a client may ask for; "replaced" is reached only through a replacement.
CardStateIn = Literal["prepared", "issued", "activated"]
CardState = Literal["prepared", "issued", "activated", "replaced"]
BlockReason = Literal["lost", "damaged", "other"]
AttributeType = Literal["string", "integer", "decimal", "boolean", "date", "datetime", "enum"]

# A person older than this is a typo (1889 for 1989), not a customer.
MAX_AGE_YEARS = 120

_CARD_NUMBER = re.compile(r"^[0-9A-Z]{4,64}$")
_CARD_SEPARATORS = re.compile(r"[\s\-]")
_ATTRIBUTE_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def normalize_card_number(raw: str) -> str | None:
    """Card numbers as printed: spaces and dashes dropped, letters upper-cased; None if malformed."""
    number = _CARD_SEPARATORS.sub("", raw).upper()
    return number if _CARD_NUMBER.match(number) else None


def _card_number(value: object) -> str:
    if not isinstance(value, str) or (number := normalize_card_number(value)) is None:
        raise PydanticCustomError("invalid_card_number", "A card number is 4 to 64 digits or Latin letters")
    return number


CardNumber = Annotated[str, BeforeValidator(_card_number)]


def latest_date_on_earth() -> date:
    # The date is already "today" somewhere at UTC+14, so a birth today there is not in the future.
    return (utcnow() + timedelta(hours=14)).date()


def check_birth_date(value: date | None) -> date | None:
    if value is None:
        return None
    today = latest_date_on_earth()
    if value > today:
        raise PydanticCustomError("invalid_birth_date", "The birth date is in the future")
    if value.year < today.year - MAX_AGE_YEARS:
        raise PydanticCustomError(
            "invalid_birth_date", f"A birth date more than {MAX_AGE_YEARS} years ago is not plausible"
        )
    return value


Name = Annotated[str, Field(max_length=100)]
ShortText = Annotated[str, Field(min_length=1, max_length=100)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Child(_In):
    name: Name | None = None
    birth_date: date | None = None
    gender: Gender | None = None

    @field_validator("birth_date")
    @classmethod
    def _birth(cls, value: date | None) -> date | None:
        return check_birth_date(value)


class ConsentIn(_In):
    granted: StrictBool
    source: ShortText | None = Field(
        default=None, description="Where it was given: pos, web, contact_center..."
    )


# `true` / `false` is shorthand for {"granted": ...} with the default source.
ConsentValue = StrictBool | ConsentIn


class ConsentsIn(_In):
    email: ConsentValue | None = None
    sms: ConsentValue | None = None
    viber: ConsentValue | None = None
    push: ConsentValue | None = None


class CardLink(_In):
    """A card given with a member: an unassigned card is linked, an unknown number is created."""

    number: CardNumber
    kind: CardKind | None = Field(default=None, description="physical when the card is new")
    state: CardStateIn | None = Field(default=None, description="prepared when the card is new")


class _MemberFields(_In):
    external_id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    first_name: Name | None = None
    last_name: Name | None = None
    middle_name: Name | None = None
    gender: Gender | None = None
    birth_date: date | None = None
    phone: Annotated[str, Field(max_length=40)] | None = None
    email: Annotated[str, Field(max_length=254)] | None = None
    address: Annotated[str, Field(max_length=1000)] | None = None
    city: Annotated[str, Field(max_length=200)] | None = None
    timezone: Annotated[str, Field(max_length=64)] | None = Field(default=None, description="IANA zone")
    children: list[Child] | None = Field(default=None, max_length=20)
    pets: list[ShortText] | None = Field(default=None, max_length=50)
    preferred_categories: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        default=None, max_length=200
    )
    attributes: dict[str, Any] | None = Field(default=None, description="Custom attribute values by code")

    @field_validator("birth_date")
    @classmethod
    def _birth(cls, value: date | None) -> date | None:
        return check_birth_date(value)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if value is None:
            return None
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise PydanticCustomError(
                "invalid_timezone", "Not an IANA time zone, e.g. Europe/Moscow"
            ) from exc
        return value


class MemberCreate(_MemberFields):
    consents: ConsentsIn | None = None
    cards: list[CardLink] = Field(default_factory=list, max_length=20)
    registered_at: datetime | None = Field(default=None, description="When the member joined; now if absent")


class MemberUpdate(_MemberFields):
    """Only the fields sent change; ``null`` clears one. Attributes are merged; ``null`` removes one."""


class ConsentOut(BaseModel):
    granted: bool
    changed_at: datetime | None
    source: str | None


class ConsentsOut(BaseModel):
    email: ConsentOut
    sms: ConsentOut
    viber: ConsentOut
    push: ConsentOut


class CardOut(BaseModel):
    number: str
    member_id: int | None
    kind: CardKind
    state: CardState
    blocked: bool
    block_reason: BlockReason | None
    block_comment: str | None
    blocked_at: datetime | None
    replaced_by: str | None = Field(description="Number of the card that replaced this one")
    issued_at: datetime | None
    activated_at: datetime | None
    created_at: datetime


class MemberOut(BaseModel):
    id: int
    external_id: str | None
    status: str
    first_name: str | None
    last_name: str | None
    middle_name: str | None
    gender: Gender | None
    birth_date: date | None
    phone: str | None
    email: str | None
    address: str | None
    city: str | None
    timezone: str | None
    children: list[dict[str, Any]]
    pets: list[str]
    preferred_categories: list[str]
    attributes: dict[str, Any]
    consents: ConsentsOut
    cards: list[CardOut]
    registered_at: datetime
    created_at: datetime
    updated_at: datetime


class CardBatchCreate(_In):
    numbers: list[CardNumber] = Field(min_length=1, max_length=1000)
    kind: CardKind = "physical"


class CardBlock(_In):
    reason: BlockReason
    comment: Annotated[str, Field(max_length=1000)] | None = None

    @model_validator(mode="after")
    def _comment_for_other(self) -> CardBlock:
        if self.reason == "other" and not self.comment:
            raise PydanticCustomError(
                "comment_required", "Say why the card is blocked when the reason is other"
            )
        return self


class CardReplace(_In):
    new_number: CardNumber


class CardReplacement(BaseModel):
    old_card: CardOut
    new_card: CardOut


class AttributeConstraints(_In):
    min: DecimalStr | None = None
    max: DecimalStr | None = None
    max_length: Annotated[int, Field(ge=1, le=100_000)] | None = None
    pattern: Annotated[str, Field(min_length=1, max_length=500)] | None = None


class AttributeDefinitionCreate(_In):
    code: str = Field(description="Lower-case letters, digits and _; the key in member attributes")
    name: Annotated[str, Field(min_length=1, max_length=200)]
    type: AttributeType
    required: bool = False
    choices: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=500
    )
    constraints: AttributeConstraints | None = None

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        if not _ATTRIBUTE_CODE.match(value):
            raise PydanticCustomError(
                "invalid_code", "A code starts with a letter and has only a-z, 0-9 and _ (at most 64)"
            )
        return value


class AttributeDefinitionUpdate(_In):
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    required: bool | None = None
    choices: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=500
    )
    constraints: AttributeConstraints | None = None


class AttributeDefinitionOut(BaseModel):
    code: str
    name: str
    type: AttributeType
    required: bool
    choices: list[str] | None
    constraints: dict[str, Any]
    created_at: datetime
