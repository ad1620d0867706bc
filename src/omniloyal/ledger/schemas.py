"""API models of the ledger: currencies, balances, movements."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from omniloyal.kernel.money import DecimalStr

EntryKind = Literal["accrual", "write_off", "expiry", "activation", "refund", "reversal"]

_CURRENCY_CODE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class CurrencyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Lower-case letters, digits, '_' or '-', e.g. `stars`")
    name: str = Field(min_length=1, max_length=100)
    precision: int = Field(default=2, description="Places kept after rounding, 0..4 (0 = whole points)")

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        value = value.strip()
        if not _CURRENCY_CODE.match(value):
            raise PydanticCustomError(
                "invalid_code", "code: 1-32 lower-case letters, digits, '_' or '-', starting with a letter"
            )
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: int) -> int:
        if not 0 <= value <= 4:
            raise PydanticCustomError("invalid_precision", "precision must be between 0 and 4")
        return value


class CurrencyOut(BaseModel):
    code: str
    name: str
    precision: int
    created_at: datetime


class Expiry(BaseModel):
    """Points that expire at one moment."""

    at: datetime
    amount: DecimalStr


class CurrencyBalance(BaseModel):
    """A member's points in one currency.

    ``total`` = ``available`` + ``reserved`` + ``pending``: every unexpired point the member holds.
    ``available`` can be spent now; ``reserved`` is held for unconfirmed purchases; ``pending``
    awaits activation. ``available`` is below zero only when the member owes points (a refund
    took back points already spent); the next accruals pay that debt first.
    """

    currency: str
    available: DecimalStr
    pending: DecimalStr
    reserved: DecimalStr
    total: DecimalStr
    next_expiries: list[Expiry] = Field(default_factory=list)


class MemberBalance(BaseModel):
    member_id: int
    at: datetime
    balances: list[CurrencyBalance]


class LedgerRequest(BaseModel):
    """A manual accrual or write-off by an operator."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["accrual", "write_off"]
    amount: DecimalStr
    currency: str | None = Field(default=None, description="Defaults to the default currency (`bonus`)")
    reason: str = Field(min_length=1, max_length=1000, description="Why: shown in the member's history")
    lifetime_days: int | None = Field(default=None, description="Accrual only: days the points live")
    activation_delay_days: int | None = Field(
        default=None, description="Accrual only: days before the points can be spent"
    )
    legal_entity: str | None = Field(
        default=None, description="Accrual only: code of the legal entity that issues the points"
    )

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise PydanticCustomError("missing_reason", "reason must say why the points move")
        return value


class LotShare(BaseModel):
    """The part of one lot an entry moved (+ into the member account, - out of it)."""

    lot_id: int
    amount: DecimalStr
    accrued_at: datetime
    activates_at: datetime
    expires_at: datetime | None


class EntryOut(BaseModel):
    """One movement in a member's history."""

    id: int
    kind: EntryKind
    # + into the member account, - out of it (activation: the amount that became spendable).
    amount: DecimalStr
    currency: str
    reason: str | None
    source: str
    source_ref: str | None
    actor: str | None
    legal_entity: str | None
    created_at: datetime
    # Of the lot concerned when there is exactly one (accrual, activation, expiry).
    activates_at: datetime | None = None
    expires_at: datetime | None = None
    lots: list[LotShare] = Field(default_factory=list)


class LedgerResult(BaseModel):
    entry: EntryOut
    balance: CurrencyBalance


class EmissionAccountOut(BaseModel):
    """What a legal entity issued in one currency; negative = points out and not yet returned."""

    id: int
    legal_entity: str
    currency: str
    balance: DecimalStr
    created_at: datetime
