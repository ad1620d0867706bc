"""Keyset pagination shared by every collection: ``?limit=&cursor=`` → ``{items, next_cursor}``."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy.orm import InstrumentedAttribute

from omniloyal.kernel.errors import AppError

T = TypeVar("T")


DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode()).decode()
        prefix, _, value = text.partition(":")
        if prefix != "id":
            raise ValueError(text)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise AppError(
            "invalid_cursor", f"Cursor {cursor!r} is not one this API returned", field="cursor"
        ) from exc


def check_limit(limit: int) -> int:
    if limit < 1 or limit > MAX_LIMIT:
        raise AppError("invalid_limit", f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    return limit


def paginate(
    stmt: Any,
    id_column: InstrumentedAttribute[Any],
    limit: int,
    cursor: str | None,
    *,
    descending: bool = False,
) -> tuple[Any, int]:
    """Keyset conditions on any select; fetch ``limit + 1`` rows and pass them to :func:`cut`."""
    limit = check_limit(limit)
    if cursor:
        last = decode_cursor(cursor)
        stmt = stmt.where(id_column < last if descending else id_column > last)
    stmt = stmt.order_by(id_column.desc() if descending else id_column).limit(limit + 1)
    return stmt, limit


def cut(rows: list[Any], limit: int, id_of: Any = lambda row: row.id) -> tuple[list[Any], str | None]:
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(id_of(rows[-1]))
    return rows, None
