"""Decimal money and points. Never float."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

ZERO = Decimal("0")
CENT = Decimal("0.01")


def quantize(value: Decimal, places: int = 2) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def _to_decimal(value: object) -> Decimal:
    # Floats are refused at the edge: 0.1 + 0.2 is not a price.
    if isinstance(value, float):
        raise ValueError('amounts are decimal strings such as "10.50", not floats')
    if isinstance(value, bool):
        raise ValueError("amount expected")
    if isinstance(value, int | Decimal):
        result = Decimal(value)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except Exception as exc:
            raise ValueError(f"{value!r} is not a decimal amount") from exc
    else:
        raise ValueError("amount expected")
    if not result.is_finite():
        raise ValueError("amount must be a finite number")
    return result


# A Decimal that arrives as a string (or int) and leaves as a string in JSON.
DecimalStr = Annotated[
    Decimal,
    BeforeValidator(_to_decimal),
    PlainSerializer(lambda v: format(v, "f"), return_type=str, when_used="json"),
]
