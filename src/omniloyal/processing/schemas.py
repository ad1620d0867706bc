"""POS API models: what tills and the online checkout send, and what they get back."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from omniloyal.kernel.money import DecimalStr

Amounts = dict[str, DecimalStr]


class Identifier(BaseModel):
    """How the buyer is identified: exactly one of card, phone, e-mail."""

    model_config = ConfigDict(extra="forbid")

    card: str | None = Field(default=None, max_length=64)
    phone: str | None = Field(default=None, max_length=40)
    email: str | None = Field(default=None, max_length=254)

    @model_validator(mode="after")
    def _exactly_one(self) -> Identifier:
        given = [name for name in ("card", "phone", "email") if getattr(self, name)]
        if len(given) != 1:
            raise PydanticCustomError("identifier_required", "Give exactly one of card, phone or email")
        return self


class ChequeLineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: int = Field(ge=1, description="Line number on the cheque, unique within it")
    sku: str = Field(min_length=1, max_length=100)
    price: DecimalStr = Field(ge=0)
    quantity: DecimalStr = Field(gt=0)
    amount: DecimalStr = Field(ge=0, description="price × quantity, before loyalty discounts")
    min_price: DecimalStr | None = Field(default=None, ge=0, description="Lowest allowed unit price")


class PaymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(min_length=1, max_length=64)
    amount: DecimalStr = Field(ge=0)


class ChequeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: str = Field(min_length=1, max_length=100)
    created_at: datetime
    lines: list[ChequeLineIn] = Field(min_length=1, max_length=1000)
    payments: list[PaymentIn] = Field(default_factory=list, max_length=20)

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise PydanticCustomError("invalid_time", "created_at must carry a UTC offset")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChequeIn:
        numbers = [line.line for line in self.lines]
        if len(set(numbers)) != len(numbers):
            raise PydanticCustomError("duplicate_line", "Line numbers must be unique within a cheque")
        for line in self.lines:
            if abs(line.price * line.quantity - line.amount) > Decimal("0.01"):
                raise PydanticCustomError(
                    "invalid_line_amount",
                    "Line {line}: amount {amount} is not price × quantity",
                    {"line": line.line, "amount": str(line.amount)},
                )
        return self


class WriteOffIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: str = "bonus"
    amount: DecimalStr = Field(gt=0)


class _StoreScoped(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation_id: str = Field(min_length=1, max_length=200, description="The till's id; repeats are harmless")
    store: str | None = Field(
        default=None, description="Store code; implied by a pos key, required for admin keys"
    )


class CalculateRequest(_StoreScoped):
    identifier: Identifier | None = None
    cheque: ChequeIn
    write_off: WriteOffIn | None = None
    explain: bool = False


class OperationRef(_StoreScoped):
    pass


class RefundLineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    line: int = Field(ge=1)
    quantity: DecimalStr = Field(gt=0)


class RefundRequest(_StoreScoped):
    purchase_operation_id: str = Field(min_length=1, max_length=200)
    lines: list[RefundLineIn] | None = Field(
        default=None, description="Lines and quantities returned; omitted = the whole purchase"
    )


class OfflineCheque(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation_id: str = Field(min_length=1, max_length=200)
    identifier: Identifier | None = None
    cheque: ChequeIn


class OfflineBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str | None = None
    cheques: list[OfflineCheque] = Field(min_length=1, max_length=500)


# ---------------------------------------------------------------- answers


class LineOut(BaseModel):
    line: int
    sku: str
    amount: DecimalStr
    discount: DecimalStr
    amount_after_discount: DecimalStr
    write_off: Amounts = Field(default_factory=dict)
    bonus: Amounts = Field(default_factory=dict)
    offers: list[int] = Field(default_factory=list)


class BalanceOut(BaseModel):
    currency: str
    available: DecimalStr
    pending: DecimalStr
    reserved: DecimalStr = Decimal(0)


class Totals(BaseModel):
    amount: DecimalStr
    discount: DecimalStr
    amount_after_discount: DecimalStr
    write_off: Amounts = Field(default_factory=dict)
    bonus: Amounts = Field(default_factory=dict)
    to_pay: DecimalStr = Field(description="Money left to pay: after discounts and points")


class Messages(BaseModel):
    cheque: list[str] = Field(default_factory=list)
    cashier: list[str] = Field(default_factory=list)


class ExplainOut(BaseModel):
    offer_id: int
    offer_name: str
    event: str
    applied: bool
    reason: str
    lines: list[int] = Field(default_factory=list)


class MemberRef(BaseModel):
    id: int
    card: str | None = None
    card_state: str | None = None
    can_spend: bool = False


class CalculateResponse(BaseModel):
    operation_id: str
    store: str
    state: Literal["calculated", "confirmed", "cancelled"]
    member: MemberRef | None = None
    lines: list[LineOut]
    totals: Totals
    balance: list[BalanceOut] = Field(default_factory=list)
    max_write_off: Amounts = Field(default_factory=dict)
    messages: Messages = Field(default_factory=Messages)
    explain: list[ExplainOut] | None = None


class ConfirmResponse(BaseModel):
    operation_id: str
    store: str
    state: Literal["confirmed", "cancelled"]
    accrued: Amounts = Field(default_factory=dict)
    written_off: Amounts = Field(default_factory=dict)
    balance: list[BalanceOut] = Field(default_factory=list)


class RefundResponse(BaseModel):
    operation_id: str
    purchase_operation_id: str
    store: str
    state: Literal["confirmed"] = "confirmed"
    amount: DecimalStr
    lines: list[dict[str, Any]]
    points_taken_back: Amounts = Field(default_factory=dict)
    points_returned: Amounts = Field(default_factory=dict)
    balance: list[BalanceOut] = Field(default_factory=list)


class BalanceResponse(BaseModel):
    member: MemberRef
    balance: list[BalanceOut]


class OfflineResult(BaseModel):
    index: int
    operation_id: str
    status: Literal["accepted", "duplicate", "rejected"]
    accrued: Amounts = Field(default_factory=dict)
    error: dict[str, Any] | None = None


class OfflineResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[OfflineResult]
