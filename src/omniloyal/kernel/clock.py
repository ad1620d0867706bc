"""Time: aware UTC inside; a single place to read 'now' so jobs and tests can pin it."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def ensure_utc(value: datetime, *, field: str = "time") -> datetime:
    """Aware datetimes are converted to UTC; naive ones are refused (ambiguous at the edge)."""
    from omniloyal.kernel.errors import AppError

    if value.tzinfo is None or value.utcoffset() is None:
        raise AppError(
            "invalid_time", f"{field} must carry a UTC offset, e.g. 2026-01-31T10:00:00+03:00", field=field
        )
    return value.astimezone(UTC)
